/* The mount client in C: `unionfs mount` and `unionfs-overlay` through the resident server without
 * starting a Python interpreter (its start and the client's imports are most of a mount's time).
 *
 * One binary, named by how it is called: as `unionfs-overlay` it takes fuse-overlayfs' command line,
 * under any other name `unionfs`'s.  It does what unionfs/server/fastmount.py does, but it does not
 * parse the command line: it hands it, with its working directory, to this user's server
 * (unionfs/server/resident.py, `plan`), which parses and checks it with the very code the Python
 * command runs and answers with the directories to open and how to mount.  The client opens them,
 * mounts FUSE (root: /dev/fuse and mount(2); other users: fusermount3, which sends the /dev/fuse fd
 * back over _FUSE_COMMFD), sends the fds over the socket and waits for "ready".
 *
 * Anything else it leaves to the Python command, the console script of the same name in the
 * directory of this binary, by exec with the same arguments: another command line (`unionfs run`,
 * --help, -f...), UNIONFS_SERVER=off, no server (the Python command starts one), a server of
 * another build, a user error (so that every error line is the Python one), a mount that fails.
 * A mount made here that the server did not take is unmounted before that.
 *
 * `unionfs umount MNT` is done here too, as unionfs/server/unmount.py does it (the interpreter's
 * start and that module's imports were nearly all of an unmount's time): the same checks of the
 * mount table, the same state directory and pidfile, `fusermount3 -u` for the unmount itself, and
 * the same one-line errors; it waits for the daemon's lock on its pidfile (held until the daemon
 * has closed every fd of the mount) rather than for its exit, which Python waits for.  What it
 * cannot say exactly as Python would (a path or a message that is not plain ASCII, a pidfile Python
 * might read otherwise) it leaves to the Python command.
 *
 * Built by scripts/setup.sh: cc -O2 -static (or without -static where there is no libc.a) -o
 *   .venv/bin/unionfs-fastclient unionfs/server/fastclient.c
 * UNIONFS_DEBUG_CLIENT=1 says on stderr why a mount took the Python path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define MAX_FDS 250         /* as fastmount.MAX_FDS: the kernel's SCM_MAX_FD is 253 */
#define MAX_MSG (1 << 16)   /* the server reads at most this much of a message */
#define MAX_FIELDS (MAX_FDS + 10)

extern char **environ;

static int debug;
static const char *prog;      /* "unionfs" or "unionfs-overlay" */
static char **given_argv;
static char bindir[PATH_MAX];
static char self_exe[PATH_MAX];

static void say(const char *fmt, ...)
{
    va_list ap;

    if (!debug)
        return;
    va_start(ap, fmt);
    fputs("unionfs (fast path): ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* Run the Python command of the same name with the same arguments. */
static void __attribute__((noreturn)) fallback(void)
{
    char path[PATH_MAX + 32];
    char real[PATH_MAX];

    snprintf(path, sizeof path, "%s/%s", bindir, prog);
    if (realpath(path, real) != NULL && strcmp(real, self_exe) == 0) {
        fprintf(stderr, "%s: %s is this C client, not the Python command\n", prog, path);
        exit(127);
    }
    execv(path, given_argv);
    fprintf(stderr, "%s: cannot run %s: %s\n", prog, path, strerror(errno));
    exit(127);
}

static int send_fds(int sock, const char *data, size_t len, const int *fds, int nfds)
{
    char control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct iovec iov = { .iov_base = (void *)data, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    struct cmsghdr *c;

    memset(control, 0, sizeof control);
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* statedir.state_dir, and a name in it (fastmount.socket_path) */
static int state_path(char *out, size_t size, const char *name)
{
    const char *base = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    int n;

    if (geteuid() == 0)
        n = snprintf(out, size, "/run/unionfs%s%s", name[0] ? "/" : "", name);
    else if (base != NULL && base[0] == '/' && stat(base, &st) == 0 && S_ISDIR(st.st_mode))
        n = snprintf(out, size, "%s/unionfs%s%s", base, name[0] ? "/" : "", name);
    else
        n = snprintf(out, size, "/tmp/unionfs-%u%s%s", (unsigned)getuid(), name[0] ? "/" : "", name);
    return n > 0 && (size_t)n < size ? 0 : -1;
}

static int same_ns(pid_t pid, const char *ns)
{
    char path[64];
    struct stat ours, theirs;

    snprintf(path, sizeof path, "/proc/self/ns/%s", ns);
    if (stat(path, &ours) != 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%d/ns/%s", (int)pid, ns);
    if (stat(path, &theirs) != 0)
        return 0;
    return ours.st_ino == theirs.st_ino && ours.st_dev == theirs.st_dev;
}

/* A connection to this user's server, checked as fastmount._connect_to checks it; -1 if none. */
static int connect_server(void)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    struct ucred cred;
    socklen_t len = sizeof cred;
    int sock;

    if (state_path(addr.sun_path, sizeof addr.sun_path, "server.sock") != 0)
        return -1;
    sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
        say("no server: %s", strerror(errno));
        close(sock);
        return -1;
    }
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != geteuid() ||
        cred.pid <= 0 || !same_ns(cred.pid, "pid") || !same_ns(cred.pid, "user")) {
        say("no server: it runs as another user or in other namespaces");
        close(sock);
        return -1;
    }
    return sock;
}

static int open_dir(const char *path)
{
    int flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC;
    int fd = open(path, flags | O_NOATIME);

    if (fd < 0 && errno == EPERM)
        fd = open(path, flags);
    return fd;
}

static int spawn_quiet(char *const argv[], char *const envp[])
{
    posix_spawn_file_actions_t fa;
    pid_t pid;
    int rc, fd;

    posix_spawn_file_actions_init(&fa);
    for (fd = 0; fd < 3; fd++)
        posix_spawn_file_actions_addopen(&fa, fd, "/dev/null", O_RDWR, 0);
    rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        say("%s: %s", argv[0], strerror(rc));
        return -1;
    }
    return pid;
}

/* fastmount._mount_as_root */
static int mount_as_root(const char *mnt, const char *fsname, unsigned long flags, const char *kopts)
{
    char data[4096];
    struct stat st;
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

    if (fd < 0) {
        say("/dev/fuse: %s", strerror(errno));
        return -1;
    }
    if (stat(mnt, &st) != 0) {
        say("%s: %s", mnt, strerror(errno));
        close(fd);
        return -1;
    }
    snprintf(data, sizeof data, "fd=%d,rootmode=%o,user_id=%u,group_id=%u,%s", fd,
             (unsigned)(st.st_mode & S_IFMT), (unsigned)getuid(), (unsigned)getgid(), kopts);
    if (mount(fsname, mnt, "fuse.unionfs", flags, data) != 0) {
        say("mount: %s", strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* fastmount._mount_with_fusermount: libfuse's protocol over _FUSE_COMMFD */
static int mount_with_fusermount(const char *mnt, const char *opts)
{
    char commfd[32];
    char *argv[] = { "fusermount3", "-o", (char *)opts, "--", (char *)mnt, NULL };
    char **envp;
    char byte;
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                          .msg_controllen = sizeof control };
    struct cmsghdr *c;
    int sv[2], n = 0, i, fd = -1, status = 0;
    pid_t pid;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        return -1;
    fcntl(sv[0], F_SETFD, FD_CLOEXEC);
    while (environ[n] != NULL)
        n++;
    envp = calloc(n + 2, sizeof *envp);
    if (envp == NULL) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    for (i = 0; i < n; i++)
        envp[i] = environ[i];
    snprintf(commfd, sizeof commfd, "_FUSE_COMMFD=%d", sv[1]);
    envp[n] = commfd;
    pid = spawn_quiet(argv, envp);
    free(envp);
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        return -1;
    }
    if (recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC) > 0) {
        c = CMSG_FIRSTHDR(&msg);
        if (c != NULL && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
    }
    close(sv[0]);
    waitpid(pid, &status, 0);
    if (fd < 0) {
        say("fusermount3 gave no fd (status %d)", status);
        return -1;
    }
    if (status != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* fastmount.unmount: take back a mount the server did not take */
static void unmount(const char *mnt)
{
    char *argv[] = { "fusermount3", "-u", "-z", "--", (char *)mnt, NULL };
    pid_t pid;

    if (geteuid() == 0) {
        if (umount2(mnt, MNT_DETACH) != 0)
            say("umount %s: %s", mnt, strerror(errno));
        return;
    }
    pid = spawn_quiet(argv, environ);
    if (pid > 0)
        waitpid(pid, NULL, 0);
}

/* ---- unionfs umount MNT (unionfs/server/unmount.py) ------------------------------------------ */

/* SHA-1 (FIPS 180-4), for the pidfile's name: statedir.key_for */
struct sha1 {
    uint32_t h[5];
    uint64_t len;
    unsigned char block[64];
    size_t used;
};

static uint32_t rol(uint32_t x, int n)
{
    return (x << n) | (x >> (32 - n));
}

static void sha1_block(struct sha1 *c, const unsigned char *p)
{
    uint32_t w[80], a, b, d, e, f, k, t, cc;
    int i;

    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3], e = c->h[4];
    for (i = 0; i < 80; i++) {
        if (i < 20)
            f = (b & cc) | (~b & d), k = 0x5a827999;
        else if (i < 40)
            f = b ^ cc ^ d, k = 0x6ed9eba1;
        else if (i < 60)
            f = (b & cc) | (b & d) | (cc & d), k = 0x8f1bbcdc;
        else
            f = b ^ cc ^ d, k = 0xca62c1d6;
        t = rol(a, 5) + f + e + k + w[i];
        e = d, d = cc, cc = rol(b, 30), b = a, a = t;
    }
    c->h[0] += a, c->h[1] += b, c->h[2] += cc, c->h[3] += d, c->h[4] += e;
}

static void sha1_add(struct sha1 *c, const void *data, size_t n)
{
    const unsigned char *p = data;

    c->len += n;
    while (n > 0) {
        size_t take = 64 - c->used < n ? 64 - c->used : n;

        memcpy(c->block + c->used, p, take);
        c->used += take, p += take, n -= take;
        if (c->used == 64) {
            sha1_block(c, c->block);
            c->used = 0;
        }
    }
}

/* The first 16 hex digits of the SHA-1 of s */
static void sha1_key(const char *s, char out[17])
{
    struct sha1 c = { .h = { 0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0 } };
    uint64_t bits;
    unsigned char pad = 0x80, zero = 0, len[8];
    int i;

    sha1_add(&c, s, strlen(s));
    bits = c.len * 8;
    sha1_add(&c, &pad, 1);
    while (c.used != 56)
        sha1_add(&c, &zero, 1);
    for (i = 0; i < 8; i++)
        len[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha1_add(&c, len, 8);
    for (i = 0; i < 8; i++)
        snprintf(out + 2 * i, 3, "%02x", (unsigned)(c.h[i / 4] >> (24 - 8 * (i % 4))) & 0xff);
}

/* Whether s is printable ASCII throughout: what Python prints as it is */
static int plain(const char *s)
{
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e)
            return 0;
    return 1;
}

/* Python's repr() of a str that is plain ASCII: quoted, backslashes and quotes as Python
 * escapes them */
static void put_repr(FILE *f, const char *s)
{
    char q = strchr(s, '\'') != NULL && strchr(s, '"') == NULL ? '"' : '\'';

    fputc(q, f);
    for (; *s; s++) {
        if (*s == '\\' || *s == q)
            fputc('\\', f);
        fputc(*s, f);
    }
    fputc(q, f);
}

/* mountinfo.mount_at: the type of the topmost mount at point, in out; 1 found, 0 not, -1 when
 * this client cannot tell as Python would */
static int mount_type_at(const char *point, char *out, size_t size)
{
    static const char *sep = " \t\v\f";
    char *data = NULL, *line, *next, *field[64], *p, *w;
    size_t cap = 0, len = 0;
    ssize_t n;
    int fd, nf, dash, found = 0, i;

    fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    do {
        if (len + 4096 + 1 > cap) {
            char *more = realloc(data, cap = cap ? 2 * cap : 65536);

            if (more == NULL) {
                free(data);
                close(fd);
                return -1;
            }
            data = more;
        }
        n = read(fd, data + len, cap - len - 1);
        if (n > 0)
            len += (size_t)n;
    } while (n > 0 || (n < 0 && errno == EINTR));
    close(fd);
    if (n < 0) {
        free(data);
        return -1;
    }
    data[len] = '\0';
    for (line = data; line != NULL && *line; line = next) {
        next = line + strcspn(line, "\r\n");   /* bytes.splitlines */
        if (*next)
            *next++ = '\0';
        else
            next = NULL;
        nf = 0;
        dash = -1;
        for (p = strtok(line, sep); p != NULL && nf < 64; p = strtok(NULL, sep)) {
            if (dash < 0 && strcmp(p, "-") == 0)
                dash = nf;
            field[nf++] = p;
        }
        if (dash < 6 || nf < dash + 4)
            continue;
        /* the mount point, its \ooo escapes undone (in place: it only shrinks) */
        for (p = w = field[4]; *p; p++, w++) {
            if (p[0] == '\\' && p[1] >= '0' && p[1] <= '7' && p[2] >= '0' && p[2] <= '7' &&
                p[3] >= '0' && p[3] <= '7') {
                i = (p[1] - '0') * 64 + (p[2] - '0') * 8 + (p[3] - '0');
                if (i > 255) {
                    free(data);
                    return -1;
                }
                *w = (char)i;
                p += 3;
            } else {
                *w = *p;
            }
        }
        *w = '\0';
        if (strcmp(field[4], point) == 0) {
            found = 1;
            snprintf(out, size, "%s", field[dash + 1]);
        }
    }
    free(data);
    return found;
}

/* statedir.PidRecord.parse: "PID START PIDNS", three fields of at most 19 ASCII digits between
 * ASCII whitespace (as bytes.split() takes it), the pid in 1..2^31-1; 0 when text is no such record */
static int parse_record(char *text, long *pid, unsigned long long *start, unsigned long long *pidns)
{
    unsigned long long v[3];
    char *p = text, *q;
    int n = 0;
    size_t len;

    for (;;) {
        p += strspn(p, " \t\n\r\v\f");
        if (*p == '\0')
            break;
        len = strcspn(p, " \t\n\r\v\f");
        if (n == 3 || len > 19 || strspn(p, "0123456789") < len)
            return 0;
        v[n++] = strtoull(p, &q, 10);
        p += len;
    }
    if (n != 3 || v[0] == 0 || v[0] >= (1ULL << 31))
        return 0;
    *pid = (long)v[0], *start = v[1], *pidns = v[2];
    return 1;
}

/* statedir.start_time: when process pid started (field 22 of /proc/PID/stat); ~0 (no time a pidfile
 * can say) when it is gone */
static unsigned long long start_time(long pid)
{
    char path[64], text[1024], *p;
    ssize_t n;
    int fd, i;

    if (pid <= 0)
        return ~0ULL;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ~0ULL;
    n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return ~0ULL;
    text[n] = '\0';
    p = strrchr(text, ')');
    for (i = 0; p != NULL && i < 20; i++)   /* to the 20th field after the name's ")" */
        p = strchr(p + 1, ' ');
    return p != NULL ? strtoull(p + 1, NULL, 10) : ~0ULL;
}

/* statedir._held: the pid /proc gives the process pidfd holds (its fdinfo's "Pid:": in /proc's own
 * PID namespace, which may not be ours); 0 when it has exited or /proc does not show it */
static long held_pid(int pidfd)
{
    char path[64], text[512], *p;
    ssize_t n;
    long pid;
    int fd;

    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = '\0';
    p = strstr(text, "\nPid:");
    if (p == NULL)
        return 0;
    pid = strtol(p + 5, NULL, 10);
    return pid > 0 ? pid : 0;
}

/* statedir.StateDir.open(create=False) and read_record: the record in the daemon's pidfile; 0 when
 * there is none to be read, -1 when the state directory cannot be named.  The pidfile's fd goes to
 * *held when its daemon holds it locked (statedir.StateDir.write_pid: until it has let go of the
 * mount), else -1. */
static int daemon_record(const char *mp, long *pid, unsigned long long *start, unsigned long long *pidns,
                         int *held)
{
    char dir[PATH_MAX], name[32], text[65];
    struct stat before, after;
    ssize_t n;
    int dfd, fd;

    if (state_path(dir, sizeof dir, "") != 0)
        return -1;
    if (lstat(dir, &before) != 0)
        return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(before.st_mode) || before.st_uid != geteuid() || (before.st_mode & 07777) != 0700)
        return 0;   /* refused: Python does not wait either */
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0)
        return 0;
    if (fstat(dfd, &after) != 0 || !S_ISDIR(after.st_mode) || after.st_uid != geteuid() ||
        (after.st_mode & 07777) != 0700 || after.st_dev != before.st_dev || after.st_ino != before.st_ino) {
        close(dfd);
        return 0;
    }
    sha1_key(mp, name);
    strcat(name, ".pid");
    fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    close(dfd);
    if (fd < 0)
        return 0;
    if (fstat(fd, &after) != 0 || !S_ISREG(after.st_mode)) {
        close(fd);
        return 0;
    }
    n = read(fd, text, 64);
    if (n >= 0 && flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK)
        *held = fd;
    else
        close(fd);   /* unlocked (a daemon of an older build, or one that let go already) */
    if (n < 0)
        return -1;
    text[n] = '\0';
    if (memchr(text, '\0', (size_t)n) != NULL)
        return 0;   /* no digit, no whitespace: Python's parse says no record too */
    return parse_record(text, pid, start, pidns);
}

/* statedir.StateDir.daemon, held: a pidfd of the daemon the pidfile names when it is a process of this
 * PID namespace that started when the pidfile says (checked while the pidfd holds the pid, so that
 * the pid cannot be another's by the time we wait); -1 when there is none to wait for, -2 when this
 * client cannot tell (Python then does) */
static int record_pidfd(const char *mp, long *pid, int *held)
{
    unsigned long long start, pidns;
    struct stat ns;
    int rc, pidfd;

    rc = daemon_record(mp, pid, &start, &pidns, held);
    if (rc <= 0)
        return rc == 0 ? -1 : -2;
    if (stat("/proc/self/ns/pid", &ns) != 0 || (unsigned long long)ns.st_ino != pidns)
        return -1;   /* a pid of another PID namespace, or no /proc: nothing here to wait for */
    pidfd = (int)syscall(SYS_pidfd_open, (pid_t)*pid, 0);
    if (pidfd < 0)
        return errno == ESRCH ? -1 : -2;   /* no pidfds: Python looks every 10 ms */
    if (start_time(held_pid(pidfd)) != start) {
        close(pidfd);
        return -1;   /* the pid is another process's now (the daemon is gone), or /proc cannot tell */
    }
    return pidfd;
}

/* record_pidfd, and the pidfile's fd in *held while its daemon (the one named, as Python would
 * wait for it) holds it locked */
static int daemon_pidfd(const char *mp, long *pid, int *held)
{
    int pidfd = record_pidfd(mp, pid, held);

    if (pidfd == -1 && *held >= 0) {   /* nothing here to wait for, nor for its lock */
        close(*held);
        *held = -1;
    }
    return pidfd;
}

/* fusermount3 -u MNT: its exit status, and the last line of what it said on stderr in msg; -1 when
 * it did not run, -2 when it failed and said why in other than ASCII */
static int fusermount_unmount(const char *mp, char *msg, size_t size)
{
    static char said[1 << 16];
    char *argv[] = { "fusermount3", "-u", (char *)mp, NULL };
    posix_spawn_file_actions_t fa;
    size_t len = 0;
    ssize_t n;
    pid_t pid;
    int pipefd[2], rc, status;
    char *start, *end, *p;

    if (pipe2(pipefd, O_CLOEXEC) != 0)
        return -1;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
    rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(pipefd[1]);
    if (rc != 0) {
        close(pipefd[0]);
        say("%s: %s", argv[0], strerror(rc));
        return -1;
    }
    for (;;) {
        if (len == sizeof said) {   /* keep the end */
            memmove(said, said + sizeof said / 2, sizeof said / 2);
            len = sizeof said / 2;
        }
        n = read(pipefd[0], said + len, sizeof said - len);
        if (n > 0)
            len += (size_t)n;
        else if (n == 0 || errno != EINTR)
            break;
    }
    close(pipefd[0]);
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    /* err = stderr.strip().splitlines(); err[-1] */
    msg[0] = '\0';
    for (p = said; p < said + len; p++)
        if ((unsigned char)*p > 0x7e || *p == '\0')
            return rc == 0 ? 0 : -2;   /* not ASCII: left to Python's decoding */
    start = said, end = said + len;
    while (start < end && (*start == ' ' || (*start >= '\t' && *start <= '\r') || (*start >= 0x1c && *start <= 0x1f)))
        start++;
    while (end > start && (end[-1] == ' ' || (end[-1] >= '\t' && end[-1] <= '\r') ||
                           (end[-1] >= 0x1c && end[-1] <= 0x1f)))
        end--;
    for (p = end; p > start && !((p[-1] >= '\n' && p[-1] <= '\r') || (p[-1] >= 0x1c && p[-1] <= 0x1e)); p--)
        ;
    snprintf(msg, size, "%.*s", (int)(end - p), p);
    return rc;
}

/* statedir.wait_for_exit: whether the process of pidfd has exited (or is a zombie: its pidfd is
 * readable from then on) within timeout seconds */
static int wait_for_exit(int pidfd, double timeout)
{
    struct pollfd pfd = { .fd = pidfd, .events = POLLIN };
    struct timespec t;
    double deadline;
    int rc;

    clock_gettime(CLOCK_MONOTONIC, &t);
    deadline = t.tv_sec + t.tv_nsec / 1e9 + timeout;
    do {
        rc = poll(&pfd, 1, (int)(timeout * 1000) + 1);
        if (rc >= 0 || errno != EINTR)
            return rc > 0;
        clock_gettime(CLOCK_MONOTONIC, &t);
        timeout = deadline - (t.tv_sec + t.tv_nsec / 1e9);
    } while (timeout > 0);
    return 0;
}

static void on_alarm(int sig)
{
    (void)sig;   /* only to interrupt flock() */
}

/* Whether the daemon let go of the pidfile's lock (held: our fd of it) within timeout seconds */
static int wait_released(int held, unsigned timeout)
{
    struct sigaction sa;
    int rc;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;   /* no SA_RESTART: a blocked flock() returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm(timeout);
    rc = flock(held, LOCK_SH);
    alarm(0);
    return rc == 0;
}

/* unmount.umount, and the CLI's "Error: ..." and exit status 1 */
static int do_umount(const char *given)
{
    char mp[PATH_MAX], kind[256], msg[4096];
    long pid = 0;
    int pidfd, rc, held = -1;

    if (!plain(given) || realpath(given, mp) == NULL || !plain(mp)) {
        say("umount: %s: not a plain path, or it does not resolve", given);
        fallback();
    }
    rc = mount_type_at(mp, kind, sizeof kind);
    if (rc < 0 || (rc > 0 && !plain(kind)))
        fallback();
    if (rc == 0 || strcmp(kind, "fuse.unionfs") != 0) {
        fputs("Error: ", stderr);
        put_repr(stderr, given);
        if (rc == 0)
            fputs(" is not mounted\n", stderr);
        else
            fprintf(stderr, " is not a unionfs mount (it is %s)\n", kind);
        return 1;
    }
    pidfd = daemon_pidfd(mp, &pid, &held);   /* taken before the unmount */
    if (pidfd == -2) {
        say("umount: cannot read the pidfile or take a pidfd: %s", strerror(errno));
        fallback();
    }
    /* Root unmounts itself, as fusermount3 -u would (it adds nothing for root where /etc/mtab is the
       kernel's): fusermount3's exec is about 2 ms.  Any failure goes to fusermount3, whose words
       the user then gets, as from the Python command. */
    if (geteuid() == 0 && umount2(mp, UMOUNT_NOFOLLOW) == 0)
        rc = 0;
    else
        rc = fusermount_unmount(mp, msg, sizeof msg);
    if (rc < 0) {   /* not run, or failed in words this client does not decode: Python runs it again */
        if (pidfd >= 0)
            close(pidfd);
        fallback();
    }
    if (rc != 0) {
        if (msg[0] != '\0')
            fprintf(stderr, "Error: %s\n", msg);
        else
            fprintf(stderr, "Error: fusermount3 -u %s failed\n", mp);
        return 1;
    }
    /* A daemon that holds its pidfile locked lets go of it once it holds nothing of the mount: its
       exit, a millisecond more, is not waited for.  Any other daemon is waited for until it exits. */
    if (held >= 0 && !wait_released(held, 60)) {
        fprintf(stderr, "Error: unmounted, but the daemon (pid %ld) has not let go of it after 60s\n", pid);
        return 1;
    }
    if (held < 0 && pidfd >= 0 && !wait_for_exit(pidfd, 60.0)) {
        fprintf(stderr, "Error: unmounted, but the daemon (pid %ld) has not exited after 60s\n", pid);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static char buf[MAX_MSG + 1];
    static int fds[MAX_FDS + 1];
    char reply[256];
    char *field[MAX_FIELDS];
    const char *base = strrchr(argv[0], '/');
    const char *env = getenv("UNIONFS_SERVER");
    size_t len = 0, arglen;
    ssize_t n;
    int sock, cwd, i, nfields = 0, npaths, nfds = 0;
    char *p, *slash, *end;
    unsigned long flags;

    given_argv = argv;
    base = base != NULL ? base + 1 : argv[0];
    prog = strcmp(base, "unionfs-overlay") == 0 ? "unionfs-overlay" : "unionfs";
    debug = getenv("UNIONFS_DEBUG_CLIENT") != NULL && getenv("UNIONFS_DEBUG_CLIENT")[0] != '\0';
    if (realpath("/proc/self/exe", self_exe) == NULL) {
        fprintf(stderr, "%s: cannot find this program: %s\n", prog, strerror(errno));
        return 127;
    }
    strcpy(bindir, self_exe);
    slash = strrchr(bindir, '/');
    *(slash == bindir ? slash + 1 : slash) = '\0';

    if (env != NULL && strcmp(env, "off") == 0)
        fallback();
    if (strcmp(prog, "unionfs") == 0 && argc == 3 && strcmp(argv[1], "umount") == 0 && argv[2][0] != '-')
        return do_umount(argv[2]);   /* as entry.fast_umount takes it; options and help: the CLI's */
    if (strcmp(prog, "unionfs") == 0 && !(argc > 1 && strcmp(argv[1], "mount") == 0) &&
        !(argc == 5 && strcmp(argv[3], "-o") == 0))
        fallback();   /* not a mount: the CLI's */

    /* "argv1", the build (our directory), the program and its arguments, NUL-separated */
    len = (size_t)snprintf(buf, sizeof buf, "argv1%c%s%c%s", 0, bindir, 0, prog);
    for (i = 1; i < argc; i++) {
        arglen = strlen(argv[i]);
        if (len + 1 + arglen > MAX_MSG)
            fallback();
        buf[len++] = '\0';
        memcpy(buf + len, argv[i], arglen);
        len += arglen;
    }
    sock = connect_server();
    if (sock < 0)
        fallback();
    cwd = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0 || send_fds(sock, buf, len, &cwd, 1) != 0)
        fallback();
    close(cwd);

    n = recv(sock, buf, MAX_MSG, 0);
    if (n < 5 || memcmp(buf, "plan", 5) != 0) {
        buf[n > 0 ? n : 0] = '\0';
        say("the server answered '%s'", n > 0 ? buf : "(nothing)");
        fallback();
    }
    buf[n] = '\0';
    end = buf + n;
    for (p = buf; p <= end && nfields < MAX_FIELDS; p += strlen(p) + 1)
        field[nfields++] = p;
    /* plan, mount point, fsname, flags, FUSE options, fusermount3 options, notes, count, paths */
    if (nfields < 8 || (npaths = atoi(field[7])) < 1 || npaths > MAX_FDS - 1 || nfields != 8 + npaths) {
        say("the server's plan is malformed");
        fallback();
    }
    for (i = 0; i < npaths; i++) {
        fds[1 + i] = open_dir(field[8 + i]);
        if (fds[1 + i] < 0) {
            say("cannot open %s: %s", field[8 + i], strerror(errno));
            fallback();
        }
    }
    flags = strtoul(field[3], NULL, 10);
    fds[0] = geteuid() == 0 ? mount_as_root(field[1], field[2], flags, field[4])
                            : mount_with_fusermount(field[1], field[5]);
    if (fds[0] < 0)
        fallback();
    nfds = 1 + npaths;
    n = send_fds(sock, "fds", 3, fds, nfds) == 0 ? recv(sock, reply, sizeof reply - 1, 0) : -1;
    if (n == 5 && memcmp(reply, "ready", 5) == 0) {
        if (field[6][0] != '\0')
            fprintf(stderr, "%s\n", field[6]);
        return 0;
    }
    reply[n > 0 ? n : 0] = '\0';
    say("the server answered '%s'", n > 0 ? reply : "(nothing)");
    unmount(field[1]);
    for (i = 0; i < nfds; i++)
        close(fds[i]);
    close(sock);
    fallback();
}
