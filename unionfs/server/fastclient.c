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
 * Built by scripts/setup.sh: cc -O2 -o .venv/bin/unionfs-fastclient unionfs/server/fastclient.c
 * UNIONFS_DEBUG_CLIENT=1 says on stderr why a mount took the Python path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

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

/* fastmount.socket_path */
static int socket_path(char *out, size_t size)
{
    const char *base = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    int n;

    if (geteuid() == 0)
        n = snprintf(out, size, "/run/unionfs/server.sock");
    else if (base != NULL && base[0] == '/' && stat(base, &st) == 0 && S_ISDIR(st.st_mode))
        n = snprintf(out, size, "%s/unionfs/server.sock", base);
    else
        n = snprintf(out, size, "/tmp/unionfs-%u/server.sock", (unsigned)getuid());
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

    if (socket_path(addr.sun_path, sizeof addr.sun_path) != 0)
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
