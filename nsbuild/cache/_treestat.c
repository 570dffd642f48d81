/* The layer cache's tree walk (nsbuild/cache/cache.py _hash_tree) in C: one lstat per entry and the
 * same record bytes as the Python loop, handed to a Python callable (a hash's update) one directory
 * at a time.  A no-op rebuild is mostly this walk; in Python it costs ~3x what `du` does (issue 17).
 *
 * walk(top: bytes, update) -> None: for every directory below top (top included), depth-first with
 * the subdirectories taken last-name-first (the Python loop's stack), its entries sorted by name,
 * one record each: REL "/" NAME "\0" "mode(octal) uid gid size ino dev mtime_ns ctime_ns nlink rdev\n",
 * REL being the directory's path below top.  OSError as the Python loop raises it (the path named). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    char *data;
    size_t len, cap;
} Buf;

/* What went wrong in a walk step, reported once the GIL is held again: errno and the path (NULL: no memory). */
typedef struct {
    int err;
    char *path;
} Failure;

static int fail(Failure *f, int err, const char *dir, const char *name) {
    f->err = err;
    f->path = malloc(strlen(dir) + (name ? strlen(name) : 0) + 2);
    if (f->path) sprintf(f->path, name ? "%s/%s" : "%s", dir, name);
    return -1;
}

static int buf_add(Buf *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p) return -1;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

typedef struct {
    char **items;
    size_t len, cap;
} List;

static int list_push(List *l, char *s) {
    if (l->len == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        char **p = realloc(l->items, cap * sizeof *p);
        if (!p) return -1;
        l->items = p;
        l->cap = cap;
    }
    l->items[l->len++] = s;
    return 0;
}

static void list_free(List *l) {
    for (size_t i = 0; i < l->len; i++) free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->len = l->cap = 0;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static long long ns(struct timespec t) { return (long long)t.tv_sec * 1000000000LL + t.tv_nsec; }

static void raise_failure(Failure *f) {
    if (f->err == ENOMEM || !f->path) {
        PyErr_NoMemory();
    } else {
        PyObject *name = PyBytes_FromString(f->path);
        errno = f->err;
        if (name) {
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
            Py_DECREF(name);
        }
    }
    free(f->path);
    f->path = NULL;
}

/* One directory's records into `out`; its subdirectories (full paths) pushed onto `stack`.  Runs
 * without the GIL: touches no Python object. */
static int one_dir(const char *dir, size_t top_len, Buf *out, List *stack, Failure *f) {
    DIR *d = opendir(dir);
    if (!d) return fail(f, errno, dir, NULL);
    List names = {0};
    struct dirent *e;
    int rc = 0;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' && (e->d_name[1] == 0 || (e->d_name[1] == '.' && e->d_name[2] == 0))) continue;
        char *copy = strdup(e->d_name);
        if (!copy || list_push(&names, copy) < 0) {
            free(copy);
            rc = fail(f, ENOMEM, dir, NULL);
            break;
        }
        errno = 0;
    }
    if (rc == 0 && errno != 0) rc = fail(f, errno, dir, NULL);
    int fd = dirfd(d);
    if (rc == 0) qsort(names.items, names.len, sizeof *names.items, by_name);
    const char *rel = dir + top_len;
    size_t rel_len = strlen(rel), dir_len = strlen(dir);
    char num[256];
    for (size_t i = 0; rc == 0 && i < names.len; i++) {
        const char *name = names.items[i];
        size_t name_len = strlen(name);
        struct stat st;
        if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            rc = fail(f, errno, dir, name);
            break;
        }
        int n = snprintf(num, sizeof num, "%o %u %u %lld %llu %llu %lld %lld %llu %llu\n", (unsigned)st.st_mode,
                         (unsigned)st.st_uid, (unsigned)st.st_gid, (long long)st.st_size,
                         (unsigned long long)st.st_ino, (unsigned long long)st.st_dev, ns(st.st_mtim),
                         ns(st.st_ctim), (unsigned long long)st.st_nlink, (unsigned long long)st.st_rdev);
        if (buf_add(out, rel, rel_len) < 0 || buf_add(out, "/", 1) < 0 || buf_add(out, name, name_len + 1) < 0 ||
            buf_add(out, num, (size_t)n) < 0) {
            rc = fail(f, ENOMEM, dir, NULL);
            break;
        }
        if (S_ISDIR(st.st_mode)) {
            char *full = malloc(dir_len + name_len + 2);
            if (full) sprintf(full, "%s/%s", dir, name);
            if (!full || list_push(stack, full) < 0) {
                free(full);
                rc = fail(f, ENOMEM, dir, NULL);
            }
        }
    }
    list_free(&names);
    closedir(d);
    return rc;
}

static PyObject *walk(PyObject *self, PyObject *args) {
    (void)self;
    const char *top;
    Py_ssize_t top_len;
    PyObject *update;
    if (!PyArg_ParseTuple(args, "y#O", &top, &top_len, &update)) return NULL;
    if ((Py_ssize_t)strlen(top) != top_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    List stack = {0};
    Buf out = {0};
    char *first = strdup(top);
    if (!first || list_push(&stack, first) < 0) {
        free(first);
        return PyErr_NoMemory();
    }
    Failure f = {0, NULL};
    PyObject *result = Py_None;
    while (stack.len) {
        char *dir = stack.items[--stack.len];
        out.len = 0;
        int rc;
        /* the layers of a build are fingerprinted in parallel threads: let them walk at once */
        Py_BEGIN_ALLOW_THREADS
        rc = one_dir(dir, (size_t)top_len, &out, &stack, &f);
        Py_END_ALLOW_THREADS
        free(dir);
        if (rc < 0) {
            raise_failure(&f);
            result = NULL;
            break;
        }
        if (out.len) {
            PyObject *r = PyObject_CallFunction(update, "y#", out.data, (Py_ssize_t)out.len);
            if (!r) {
                result = NULL;
                break;
            }
            Py_DECREF(r);
        }
    }
    list_free(&stack);
    free(out.data);
    if (result) Py_INCREF(result);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS, "walk(top, update): every entry's stat record below top, a directory at a time"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_treestat", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__treestat(void) { return PyModule_Create(&module); }
