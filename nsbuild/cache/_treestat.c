/* The layer cache's tree walk (nsbuild/cache/cache.py _hash_tree) in C: one lstat per entry and the
 * same record bytes as the Python loop, handed to a Python callable (a hash's update) one directory
 * at a time.  A no-op rebuild is mostly this walk; in Python it costs ~3x what `du` does (issue 17).
 *
 * walk(top: bytes, update, threads=1) -> None: for every directory below top (top included), depth-first with
 * the subdirectories taken last-name-first (the Python loop's stack), its entries sorted by name,
 * one record each: REL "/" NAME "\0" "mode(octal) uid gid size ino dev mtime_ns ctime_ns nlink rdev\n",
 * REL being the directory's path below top.  OSError as the Python loop raises it (the path named).
 * `threads` threads read directories at once; the records are handed over in order once all are read. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <pthread.h>
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

/* One directory of the walk: its records, its subdirectories in the order their records follow
 * (the Python loop's stack pops the last name first), or what went wrong reading it. */
typedef struct Node {
    char *path;
    Buf buf;
    struct Node **kids;
    size_t nkids;
    Failure fail;
} Node;

/* The directories waiting to be read, shared by the threads of one walk. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    Node **todo;
    size_t len, cap;
    int busy; /* threads reading a directory now */
    size_t top_len;
} Pool;

static Node *node_new(char *path) {
    Node *n = calloc(1, sizeof *n);
    if (n) n->path = path;
    return n;
}

/* Read one directory into its node; its subdirectories become its kids (not yet read). */
static void read_node(Node *n, size_t top_len) {
    List subs = {0};
    if (one_dir(n->path, top_len, &n->buf, &subs, &n->fail) == 0 && subs.len) {
        n->kids = calloc(subs.len, sizeof *n->kids);
        if (!n->kids) {
            fail(&n->fail, ENOMEM, n->path, NULL);
        } else {
            for (size_t i = 0; i < subs.len; i++) {
                Node *kid = node_new(subs.items[subs.len - 1 - i]);
                if (!kid) {
                    fail(&n->fail, ENOMEM, n->path, NULL);
                    break;
                }
                subs.items[subs.len - 1 - i] = NULL; /* the kid owns its path now */
                n->kids[n->nkids++] = kid;
            }
        }
    }
    list_free(&subs); /* the paths no kid took (list_free frees NULL fine) */
    free(n->path);
    n->path = NULL;
}

static void *worker(void *arg) {
    Pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->len == 0 && p->busy > 0) pthread_cond_wait(&p->cv, &p->mu);
        if (p->len == 0) break; /* nothing queued and nobody who could queue more */
        Node *n = p->todo[--p->len];
        p->busy++;
        pthread_mutex_unlock(&p->mu);
        read_node(n, p->top_len);
        pthread_mutex_lock(&p->mu);
        if (p->len + n->nkids > p->cap) {
            size_t cap = p->cap ? p->cap : 64;
            while (cap < p->len + n->nkids) cap *= 2;
            Node **t = realloc(p->todo, cap * sizeof *t);
            if (t) {
                p->todo = t;
                p->cap = cap;
            }
        }
        if (p->len + n->nkids <= p->cap) {
            for (size_t i = 0; i < n->nkids; i++) p->todo[p->len++] = n->kids[i];
        } else { /* no memory to queue them: read them here */
            for (size_t i = 0; i < n->nkids; i++) {
                pthread_mutex_unlock(&p->mu);
                read_node(n->kids[i], p->top_len);
                pthread_mutex_lock(&p->mu);
                if (n->kids[i]->nkids) fail(&n->kids[i]->fail, ENOMEM, "", NULL);
            }
        }
        p->busy--;
        pthread_cond_broadcast(&p->cv);
    }
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void node_free(Node *n) {
    if (!n) return;
    for (size_t i = 0; i < n->nkids; i++) node_free(n->kids[i]);
    free(n->kids);
    free(n->buf.data);
    free(n->path);
    free(n->fail.path);
    free(n);
}

/* The records in the Python loop's order: a directory's, then each kid's subtree, depth first. */
static int emit(Node *root, PyObject *update) {
    List stack = {0};
    if (list_push(&stack, (char *)root) < 0) return PyErr_NoMemory(), -1;
    int rc = 0;
    while (rc == 0 && stack.len) {
        Node *n = (Node *)stack.items[--stack.len];
        if (n->fail.err) {
            raise_failure(&n->fail);
            rc = -1;
            break;
        }
        if (n->buf.len) {
            PyObject *r = PyObject_CallFunction(update, "y#", n->buf.data, (Py_ssize_t)n->buf.len);
            if (!r) {
                rc = -1;
                break;
            }
            Py_DECREF(r);
        }
        for (size_t i = n->nkids; rc == 0 && i > 0; i--)
            if (list_push(&stack, (char *)n->kids[i - 1]) < 0) rc = (PyErr_NoMemory(), -1);
    }
    free(stack.items); /* nodes, not strings: node_free owns them */
    return rc;
}

static PyObject *walk(PyObject *self, PyObject *args) {
    (void)self;
    const char *top;
    Py_ssize_t top_len;
    PyObject *update;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "y#O|i", &top, &top_len, &update, &threads)) return NULL;
    if ((Py_ssize_t)strlen(top) != top_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    char *first = strdup(top);
    Node *root = first ? node_new(first) : NULL;
    if (!root) {
        free(first);
        return PyErr_NoMemory();
    }
    Pool pool = {.todo = malloc(64 * sizeof(Node *)), .cap = 64, .top_len = (size_t)top_len};
    if (!pool.todo) {
        node_free(root);
        return PyErr_NoMemory();
    }
    pool.todo[pool.len++] = root;
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_t helpers[16];
    int started = 0;
    /* Reading directories is system calls: the threads of one walk (and the build's other layers) at once. */
    Py_BEGIN_ALLOW_THREADS
    for (int i = 1; i < threads; i++)
        if (pthread_create(&helpers[started], NULL, worker, &pool) == 0) started++;
    worker(&pool);
    for (int i = 0; i < started; i++) pthread_join(helpers[i], NULL);
    Py_END_ALLOW_THREADS
    pthread_mutex_destroy(&pool.mu);
    pthread_cond_destroy(&pool.cv);
    free(pool.todo);
    int rc = emit(root, update);
    node_free(root);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS, "walk(top, update, threads=1): every entry's stat record below top, a directory at a time"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_treestat", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__treestat(void) { return PyModule_Create(&module); }
