/* Buffered reads racing with asynchronous O_DIRECT writes of one file.
 *
 * direct_race FILE ROUNDS: FILE holds at least 64 KiB.  A thread reads the first 64 KiB through a
 * buffered fd without pause; the main thread writes round k's pattern (every byte k) into a 4 KiB block of it with
 * io_submit on an O_DIRECT fd and waits for it, then reads it back buffered through the fd opened
 * before (the reader's) and through one opened after.  Prints the rounds whose reads were stale. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SIZE 65536
#define CHUNK 4096

static int before;
static atomic_int done;

static void *reader(void *arg) {
    char *buf = malloc(SIZE);
    (void)arg;
    while (!atomic_load(&done))
        if (pread(before, buf, SIZE, 0) < 0) { perror("pread"); exit(2); }
    free(buf);
    return NULL;
}

static int stale(int fd, unsigned char k, off_t off) {
    static unsigned char buf[CHUNK];
    if (pread(fd, buf, CHUNK, off) != CHUNK) { perror("pread"); exit(2); }
    for (int i = 0; i < CHUNK; i++)
        if (buf[i] != k) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: direct_race FILE ROUNDS\n"); return 2; }
    int rounds = atoi(argv[2]);
    int direct = open(argv[1], O_RDWR | O_DIRECT);
    before = open(argv[1], O_RDONLY);
    if (direct < 0 || before < 0) { perror("open"); return 2; }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, 1, &ctx) < 0) { perror("io_setup"); return 2; }
    void *buf;
    if (posix_memalign(&buf, 4096, SIZE)) return 2;
    pthread_t t;
    pthread_create(&t, NULL, reader, NULL);
    int bad = 0;
    for (int r = 1; r <= rounds; r++) {
        unsigned char k = (unsigned char)(r % 250 + 1);
        off_t off = (off_t)(r % (SIZE / CHUNK)) * CHUNK;
        memset(buf, k, CHUNK);
        struct iocb cb = {0};
        struct iocb *cbs[1] = {&cb};
        cb.aio_fildes = direct;
        cb.aio_lio_opcode = IOCB_CMD_PWRITE;
        cb.aio_buf = (unsigned long)buf;
        cb.aio_nbytes = CHUNK;
        cb.aio_offset = off;
        if (syscall(SYS_io_submit, ctx, 1, cbs) != 1) { perror("io_submit"); return 2; }
        struct io_event ev;
        if (syscall(SYS_io_getevents, ctx, 1, 1, &ev, NULL) != 1) { perror("io_getevents"); return 2; }
        if ((long)ev.res != CHUNK) { fprintf(stderr, "write: %lld\n", (long long)ev.res); return 2; }
        int after = open(argv[1], O_RDONLY);
        if (after < 0) { perror("open"); return 2; }
        int s = stale(before, k, off) | stale(after, k, off) << 1;
        close(after);
        if (s) { printf("round %d: stale %s\n", r, s == 1 ? "before" : s == 2 ? "after" : "both"); bad++; }
    }
    atomic_store(&done, 1);
    pthread_join(t, NULL);
    printf("%d of %d rounds stale\n", bad, rounds);
    return 0;
}
