/* The tar writer's per-entry loop for a plain directory tree, in C (nsbuild.tar.fasttree drives it).
 *
 * It emits the same bytes, through the same out.write() calls, as the pure-Python loop of
 * nsbuild.tar.tarwriter.write_tar: entries below one host directory, names byte-sorted per directory,
 * parents first, headers from the owner's template.  Every entry it cannot encode on its own (xattrs,
 * hardlinks, devices, fifos, sockets, names needing PAX, an lstat that failed, an owner without a
 * template) goes to the Python `slow` callback, which builds it as the pure path does.  The block
 * layout of a gzip layer depends on the write() boundaries, so the pending-buffer rule is the Python
 * one: flush after a small file once the buffer holds 1 MiB, and around every large file.
 *
 * Nothing is followed: directories and files are opened relative to their parent's descriptor with
 * O_NOFOLLOW.  The GIL is released around the system calls, so the writer thread hashes and
 * compresses meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define BLOCK 512
#define COPY_CHUNK (1 << 20)
#define SMALL_FILE (64 * 1024)
#define MAX_OCTAL_11 077777777777LL

/* What the Python error callback is told (fasttree._raise). */
enum { E_OPEN = 1, E_SHRANK = 2, E_READ = 3, E_OPENDIR = 4 };

typedef struct {
    PyObject *write;    /* out.write */
    PyObject *tmpl_cb;  /* (uid, gid) -> (bytes, int) | None */
    PyObject *slow_cb;  /* (rel, host) -> (bytes, int, bool): header(s), data size, descend */
    PyObject *err_cb;   /* (host, code, errno) -> raises */
    PyObject *cancel;   /* () -> bool, or None */
    PyObject *pending;  /* bytearray */
    Py_ssize_t entries;
    int have_tmpl;      /* the cache below is for (t_uid, t_gid) */
    uid_t t_uid;
    gid_t t_gid;
    int t_none;         /* that owner has no template */
    unsigned char tmpl[BLOCK];
    long tsum;
    char *rel, *host;   /* growing path buffers, NUL-terminated */
    char *small;        /* SMALL_FILE bytes: a small file's data, read without the GIL */
    size_t rel_cap, host_cap;
} W;

static int grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 256;
    while (n < need) n *= 2;
    char *p = realloc(*buf, n);
    if (!p) { PyErr_NoMemory(); return -1; }
    *buf = p;
    *cap = n;
    return 0;
}

static int pending_append(W *w, const void *data, Py_ssize_t n) {
    Py_ssize_t len = PyByteArray_GET_SIZE(w->pending);
    if (PyByteArray_Resize(w->pending, len + n) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(w->pending) + len, data, (size_t)n);
    return 0;
}

static int call_write(W *w, PyObject *data) {
    PyObject *r = PyObject_CallOneArg(w->write, data);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static int check_cancel(W *w) {
    if (w->cancel == Py_None) return 0;
    PyObject *r = PyObject_CallNoArgs(w->cancel);
    if (!r) return -1;
    int set = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (set) { PyErr_SetNone(PyExc_KeyboardInterrupt); return -1; }
    return set < 0 ? -1 : 0;
}

/* Hand the pending bytearray to the writer and start a new one (the writer keeps the old one). */
static int flush(W *w) {
    if (check_cancel(w) < 0) return -1;
    if (call_write(w, w->pending) < 0) return -1;
    PyObject *fresh = PyByteArray_FromStringAndSize(NULL, 0);
    if (!fresh) return -1;
    Py_SETREF(w->pending, fresh);
    return 0;
}

static int raise_err(W *w, int code, int err) {
    PyObject *r = PyObject_CallFunction(w->err_cb, "yii", w->host, code, err);
    Py_XDECREF(r);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "fasttar: error callback returned");
    return -1;
}

/* The owner's template, or 1 when it has none (the entry then takes the slow path). */
static int lookup_template(W *w, uid_t uid, gid_t gid) {
    if (w->have_tmpl && w->t_uid == uid && w->t_gid == gid) return w->t_none;
    PyObject *r = PyObject_CallFunction(w->tmpl_cb, "kk", (unsigned long)uid, (unsigned long)gid);
    if (!r) return -1;
    w->have_tmpl = 1;
    w->t_uid = uid;
    w->t_gid = gid;
    w->t_none = 1;
    if (r != Py_None) {
        PyObject *h = PyTuple_GetItem(r, 0), *s = PyTuple_GetItem(r, 1);
        if (!h || !s || !PyBytes_Check(h) || PyBytes_GET_SIZE(h) != BLOCK) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_TypeError, "fasttar: a template is (512 bytes, int)");
            w->have_tmpl = 0;
            return -1;
        }
        memcpy(w->tmpl, PyBytes_AS_STRING(h), BLOCK);
        w->tsum = PyLong_AsLong(s);
        w->t_none = 0;
    }
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : w->t_none;
}

static int is_ascii(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] & 0x80) return 0;
    return 1;
}

static long byte_sum(const unsigned char *s, size_t n) {
    long t = 0;
    for (size_t i = 0; i < n; i++) t += s[i];
    return t;
}

/* _fast_header: the ustar block for an entry needing no PAX record; 0 when it needs one. */
static int fast_header(W *w, unsigned char *h, const char *name, size_t nlen, int perm, long long size,
                       char flag, const char *link, size_t llen) {
    const char *prefix = NULL;
    size_t plen = 0;
    if (!is_ascii(name, nlen) || llen > 100 || !is_ascii(link, llen) || size > MAX_OCTAL_11) return 0;
    if (nlen > 100) {
        /* ustar's prefix field holds a leading part of the path, cut at a slash. */
        long cut = -1;
        for (long i = (long)(nlen < 156 ? nlen : 156) - 1; i >= 0; i--)
            if (name[i] == '/') { cut = i; break; }
        while (cut > 0 && nlen - (size_t)cut - 1 > 100) {
            long c = -1;
            for (long i = cut - 1; i >= 0; i--)
                if (name[i] == '/') { c = i; break; }
            cut = c;
        }
        if (cut <= 0) return 0;
        prefix = name;
        plen = (size_t)cut;
        name += cut + 1;
        nlen -= (size_t)cut + 1;
    }
    char mode[9], sz[13], chk[9];
    snprintf(mode, sizeof mode, "%07o", perm);
    snprintf(sz, sizeof sz, "%011llo", size);
    memcpy(h, w->tmpl, BLOCK);
    memcpy(h, name, nlen);
    memcpy(h + 100, mode, 8); /* with its NUL */
    memcpy(h + 124, sz, 12);
    h[156] = (unsigned char)flag;
    long sum = w->tsum + byte_sum((const unsigned char *)name, nlen) + byte_sum((unsigned char *)mode, 7) +
               byte_sum((unsigned char *)sz, 11) + (unsigned char)flag;
    if (llen) {
        memcpy(h + 157, link, llen);
        sum += byte_sum((const unsigned char *)link, llen);
    }
    if (plen) {
        memcpy(h + 345, prefix, plen);
        sum += byte_sum((const unsigned char *)prefix, plen);
    }
    snprintf(chk, sizeof chk, "%06lo", sum);
    memcpy(h + 148, chk, 7); /* six digits, NUL */
    h[155] = ' ';
    return 1;
}

/* 1 when the names list holds nothing but skipped xattrs (security.selinux), 0 otherwise. */
static int only_skipped(const char *names, ssize_t n) {
    for (ssize_t i = 0; i < n;) {
        const char *s = names + i;
        size_t l = strlen(s);
        if (strcmp(s, "security.selinux") != 0) return 0;
        i += (ssize_t)l + 1;
    }
    return 1;
}

/* 1 when the entry has xattrs worth recording (the slow path reads them), 0 none, -1 an error the
 * slow path meets again (it raises as the pure path does). */
static int has_xattrs(int fd, const char *path) {
    char names[1024];
    ssize_t n = fd >= 0 ? flistxattr(fd, names, sizeof names) : llistxattr(path, names, sizeof names);
    if (n < 0) return (errno == ENOTSUP || errno == EPERM) ? 0 : 1;
    return only_skipped(names, n) ? 0 : 1;
}

static int walk_dir(W *w, int dfd, size_t rlen, size_t hlen);

/* Set rel and host to the child `name` of the directory at (rlen, hlen). */
static int set_child(W *w, size_t rlen, size_t hlen, const char *name, size_t nlen) {
    if (grow(&w->rel, &w->rel_cap, rlen + nlen + 3) < 0 || grow(&w->host, &w->host_cap, hlen + nlen + 2) < 0)
        return -1;
    size_t r = rlen, h = hlen;
    if (r) w->rel[r++] = '/';
    memcpy(w->rel + r, name, nlen + 1);
    if (!h || w->host[h - 1] != '/') w->host[h++] = '/';
    memcpy(w->host + h, name, nlen + 1);
    return 0;
}

/* The Python path for the current entry; appends its header(s), copies `size` bytes of data from
 * the file, and says whether to descend. */
static int slow_entry(W *w, int dfd, const char *name, size_t nlen, size_t rlen, size_t hlen);

static int read_full(int fd, char *dst, size_t size, int *err) {
    size_t got = 0;
    while (got < size) {
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = read(fd, dst + got, size - got);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) continue;
            *err = errno;
            return -1;
        }
        if (n == 0) { *err = 0; return -1; }
        got += (size_t)n;
    }
    return 0;
}

/* The data of an open file after its header: batched when small, streamed when large. */
static int file_data(W *w, int fd, long long size) {
    static const char zeros[BLOCK];
    int err = 0;
    size_t pad = (size_t)((BLOCK - size % BLOCK) % BLOCK);
    if (size <= SMALL_FILE) {
        Py_ssize_t len = PyByteArray_GET_SIZE(w->pending);
        if (PyByteArray_Resize(w->pending, len + (Py_ssize_t)size) < 0) return -1;
        if (read_full(fd, PyByteArray_AS_STRING(w->pending) + len, (size_t)size, &err) < 0)
            return raise_err(w, err ? E_READ : E_SHRANK, err);
        if (pending_append(w, zeros, (Py_ssize_t)pad) < 0) return -1;
        if (PyByteArray_GET_SIZE(w->pending) >= COPY_CHUNK) return flush(w);
        return 0;
    }
    if (flush(w) < 0) return -1;
    long long remaining = size;
    while (remaining) {
        if (check_cancel(w) < 0) return -1;
        Py_ssize_t want = remaining < COPY_CHUNK ? (Py_ssize_t)remaining : COPY_CHUNK;
        PyObject *chunk = PyBytes_FromStringAndSize(NULL, want);
        if (!chunk) return -1;
        ssize_t n;
        do {
            Py_BEGIN_ALLOW_THREADS
            n = read(fd, PyBytes_AS_STRING(chunk), (size_t)want);
            Py_END_ALLOW_THREADS
        } while (n < 0 && errno == EINTR);
        if (n <= 0) {
            int e = n < 0 ? errno : 0;
            Py_DECREF(chunk);
            return raise_err(w, e ? E_READ : E_SHRANK, e);
        }
        if (n < want && _PyBytes_Resize(&chunk, n) < 0) return -1;
        int rc = call_write(w, chunk);
        Py_DECREF(chunk);
        if (rc < 0) return -1;
        remaining -= n;
    }
    if (pad) {
        PyObject *z = PyBytes_FromStringAndSize(zeros, (Py_ssize_t)pad);
        if (!z) return -1;
        int rc = call_write(w, z);
        Py_DECREF(z);
        if (rc < 0) return -1;
    }
    return 0;
}

static int open_file(W *w, int dfd, const char *name, int *fd) {
    int e;
    Py_BEGIN_ALLOW_THREADS
    *fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    e = errno;
    Py_END_ALLOW_THREADS
    if (*fd < 0) return raise_err(w, E_OPEN, e);
    return 0;
}

/* Open, xattr check and read of a small file, in one stretch without the GIL (the system calls
 * of an entry of a many-small-files tree, where taking the GIL back per call would cost as much).
 * 0 read; E_OPEN / E_READ / E_SHRANK with *err; -1 it has xattrs (the slow path takes it). */
static int slurp(int dfd, const char *name, char *dst, size_t size, int *err) {
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
        rc = E_OPEN;
    } else {
        if (has_xattrs(fd, NULL)) {
            rc = -1;
        } else {
            size_t got = 0;
            while (got < size) {
                ssize_t n = read(fd, dst + got, size - got);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) {
                    *err = n < 0 ? errno : 0;
                    rc = n < 0 ? E_READ : E_SHRANK;
                    break;
                }
                got += (size_t)n;
            }
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    return rc;
}

static int small_file(W *w, int dfd, const char *name, size_t nlen, size_t rlen, size_t hlen, const struct stat *st) {
    static const char zeros[BLOCK];
    unsigned char h[BLOCK];
    size_t size = (size_t)st->st_size;
    int err = 0, rc = slurp(dfd, name, w->small, size, &err);
    if (rc == -1) return slow_entry(w, dfd, name, nlen, rlen, hlen);
    if (rc) return raise_err(w, rc, err);
    if (!fast_header(w, h, w->rel, strlen(w->rel), st->st_mode & 07777, st->st_size, '0', "", 0))
        return slow_entry(w, dfd, name, nlen, rlen, hlen);
    w->entries++;
    if (pending_append(w, h, BLOCK) < 0 || pending_append(w, w->small, (Py_ssize_t)size) < 0 ||
        pending_append(w, zeros, (Py_ssize_t)((BLOCK - size % BLOCK) % BLOCK)) < 0)
        return -1;
    return PyByteArray_GET_SIZE(w->pending) >= COPY_CHUNK ? flush(w) : 0;
}

static int regular(W *w, int dfd, const char *name, size_t nlen, size_t rlen, size_t hlen, const struct stat *st) {
    unsigned char h[BLOCK];
    int fd = -1, x;
    if (st->st_nlink > 1) return slow_entry(w, dfd, name, nlen, rlen, hlen);
    if (st->st_size > 0 && st->st_size <= SMALL_FILE) return small_file(w, dfd, name, nlen, rlen, hlen, st);
    if (st->st_size > 0) {
        if (open_file(w, dfd, name, &fd) < 0) return -1;
        Py_BEGIN_ALLOW_THREADS
        x = has_xattrs(fd, NULL);
        Py_END_ALLOW_THREADS
    } else {
        Py_BEGIN_ALLOW_THREADS
        x = has_xattrs(-1, w->host);
        Py_END_ALLOW_THREADS
    }
    if (x || !fast_header(w, h, w->rel, strlen(w->rel), st->st_mode & 07777, st->st_size, '0', "", 0)) {
        if (fd >= 0) close(fd);
        return slow_entry(w, dfd, name, nlen, rlen, hlen);
    }
    w->entries++;
    int rc = pending_append(w, h, BLOCK);
    if (rc == 0 && fd >= 0) rc = file_data(w, fd, st->st_size);
    if (fd >= 0) close(fd);
    return rc;
}

static int symlink_entry(W *w, int dfd, const char *name, size_t nlen, size_t rlen, size_t hlen,
                         const struct stat *st) {
    unsigned char h[BLOCK];
    char target[256];
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = readlinkat(dfd, name, target, sizeof target);
    Py_END_ALLOW_THREADS
    if (n < 0 || n > 100 ||
        !fast_header(w, h, w->rel, strlen(w->rel), st->st_mode & 07777, 0, '2', target, (size_t)n))
        return slow_entry(w, dfd, name, nlen, rlen, hlen);
    w->entries++;
    return pending_append(w, h, BLOCK);
}

static int open_dir(W *w, int dfd, const char *name, int *fd) {
    int e;
    Py_BEGIN_ALLOW_THREADS
    *fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    e = errno;
    Py_END_ALLOW_THREADS
    if (*fd < 0) return raise_err(w, E_OPENDIR, e);
    return 0;
}

static int directory(W *w, int dfd, const char *name, size_t nlen, size_t rlen, size_t hlen, const struct stat *st) {
    unsigned char h[BLOCK];
    int fd, x, e;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    e = errno;
    Py_END_ALLOW_THREADS
    /* No longer a directory: the slow path lstats it again and takes what is there now. */
    if (fd < 0 && e == ENOTDIR) return slow_entry(w, dfd, name, nlen, rlen, hlen);
    if (fd < 0) return raise_err(w, E_OPENDIR, e);
    Py_BEGIN_ALLOW_THREADS
    x = has_xattrs(fd, NULL);
    Py_END_ALLOW_THREADS
    size_t l = strlen(w->rel);
    w->rel[l] = '/';
    w->rel[l + 1] = 0;
    int fast = !x && fast_header(w, h, w->rel, l + 1, st->st_mode & 07777, 0, '5', "", 0);
    w->rel[l] = 0;
    if (!fast) {
        close(fd);
        return slow_entry(w, dfd, name, nlen, rlen, hlen);
    }
    w->entries++;
    if (pending_append(w, h, BLOCK) < 0) {
        close(fd);
        return -1;
    }
    return walk_dir(w, fd, l, strlen(w->host));
}

static int slow_entry(W *w, int dfd, const char *name, size_t nlen, size_t rlen, size_t hlen) {
    (void)nlen;
    (void)rlen;
    (void)hlen;
    PyObject *r = PyObject_CallFunction(w->slow_cb, "yy", w->rel, w->host);
    if (!r) return -1;
    PyObject *header;
    long long size;
    int descend;
    if (!PyArg_ParseTuple(r, "SLp", &header, &size, &descend)) {
        Py_DECREF(r);
        return -1;
    }
    w->entries++;
    int rc = pending_append(w, PyBytes_AS_STRING(header), PyBytes_GET_SIZE(header));
    Py_DECREF(r);
    if (rc < 0) return -1;
    if (size > 0) {
        int fd;
        if (open_file(w, dfd, name, &fd) < 0) return -1;
        rc = file_data(w, fd, size);
        close(fd);
        return rc;
    }
    if (descend) {
        int fd;
        if (open_dir(w, dfd, name, &fd) < 0) return -1;
        return walk_dir(w, fd, strlen(w->rel), strlen(w->host));
    }
    return 0;
}

typedef struct {
    char *name;
    int err; /* lstat failed */
    struct stat st;
} Child;

static int cmp_names(const void *a, const void *b) { return strcmp(((const Child *)a)->name, ((const Child *)b)->name); }

/* The sorted children of a directory with their lstat (taking over dfd into `dir`), in one stretch
 * without the GIL; NULL with an exception on failure. */
static Child *list_dir(W *w, int dfd, DIR **dir, size_t *count) {
    size_t n = 0, cap = 64;
    Child *kids = malloc(cap * sizeof *kids);
    int e = 0;
    if (!kids) { close(dfd); PyErr_NoMemory(); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    *dir = fdopendir(dfd);
    if (!*dir) e = errno;
    struct dirent *d;
    while (*dir && (errno = 0, d = readdir(*dir)) != NULL) {
        if (d->d_name[0] == '.' && (!d->d_name[1] || (d->d_name[1] == '.' && !d->d_name[2]))) continue;
        if (n == cap) {
            Child *p = realloc(kids, (cap *= 2) * sizeof *kids);
            if (!p) { e = ENOMEM; break; }
            kids = p;
        }
        if (!(kids[n].name = strdup(d->d_name))) { e = ENOMEM; break; }
        n++;
    }
    if (*dir && !e && errno) e = errno;
    if (!e) {
        qsort(kids, n, sizeof *kids, cmp_names);
        for (size_t i = 0; i < n; i++)
            kids[i].err = fstatat(dirfd(*dir), kids[i].name, &kids[i].st, AT_SYMLINK_NOFOLLOW) < 0;
    }
    Py_END_ALLOW_THREADS
    if (!*dir) close(dfd);
    if (e) {
        for (size_t i = 0; i < n; i++) free(kids[i].name);
        free(kids);
        if (*dir) closedir(*dir);
        *dir = NULL;
        raise_err(w, E_OPENDIR, e);
        return NULL;
    }
    *count = n;
    return kids;
}

static int entry(W *w, int dfd, const Child *kid, size_t rlen, size_t hlen) {
    const char *name = kid->name;
    size_t nlen = strlen(name);
    const struct stat *st = &kid->st;
    if (set_child(w, rlen, hlen, name, nlen) < 0) return -1;
    if (kid->err) return slow_entry(w, dfd, name, nlen, rlen, hlen);
    int none = lookup_template(w, st->st_uid, st->st_gid);
    if (none < 0) return -1;
    if (none) return slow_entry(w, dfd, name, nlen, rlen, hlen);
    if (S_ISREG(st->st_mode)) return regular(w, dfd, name, nlen, rlen, hlen, st);
    if (S_ISDIR(st->st_mode)) return directory(w, dfd, name, nlen, rlen, hlen, st);
    if (S_ISLNK(st->st_mode)) return symlink_entry(w, dfd, name, nlen, rlen, hlen, st);
    return slow_entry(w, dfd, name, nlen, rlen, hlen);
}

/* Every entry below the directory open at dfd (closed here); rel/host hold its paths up to rlen/hlen. */
static int walk_dir(W *w, int dfd, size_t rlen, size_t hlen) {
    DIR *dir = NULL;
    size_t n = 0, i;
    Child *kids = list_dir(w, dfd, &dir, &n);
    if (!kids) return -1;
    int rc = 0;
    for (i = 0; i < n && rc == 0; i++) rc = entry(w, dirfd(dir), &kids[i], rlen, hlen);
    for (i = 0; i < n; i++) free(kids[i].name);
    free(kids);
    closedir(dir);
    return rc;
}

static PyObject *write_tree(PyObject *self, PyObject *args) {
    (void)self;
    W w;
    memset(&w, 0, sizeof w);
    const char *host, *rel;
    Py_ssize_t hlen, rlen;
    PyObject *pending;
    if (!PyArg_ParseTuple(args, "y#y#OOOOOY", &host, &hlen, &rel, &rlen, &w.write, &w.tmpl_cb, &w.slow_cb,
                          &w.err_cb, &w.cancel, &pending))
        return NULL;
    Py_INCREF(pending);
    w.pending = pending;
    PyObject *result = NULL;
    if (grow(&w.rel, &w.rel_cap, (size_t)rlen + 1) < 0 || grow(&w.host, &w.host_cap, (size_t)hlen + 1) < 0)
        goto out;
    if (!(w.small = malloc(SMALL_FILE))) {
        PyErr_NoMemory();
        goto out;
    }
    memcpy(w.rel, rel, (size_t)rlen + 1);
    memcpy(w.host, host, (size_t)hlen + 1);
    int fd, e;
    Py_BEGIN_ALLOW_THREADS
    fd = open(w.host, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    e = errno;
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        raise_err(&w, E_OPENDIR, e);
        goto out;
    }
    if (walk_dir(&w, fd, (size_t)rlen, (size_t)hlen) == 0)
        result = Py_BuildValue("nO", w.entries, w.pending);
out:
    Py_XDECREF(w.pending);
    free(w.rel);
    free(w.host);
    free(w.small);
    return result;
}

static PyMethodDef methods[] = {
    {"write_tree", write_tree, METH_VARARGS,
     "write_tree(host, rel, write, template, slow, error, cancel, pending) -> (entries, pending)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fasttar", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fasttar(void) { return PyModule_Create(&module); }
