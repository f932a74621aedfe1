/* vsock-tool: the initramfs's vsock helper (busybox has none).
 *   vsock-tool echo PORT         accept one connection on PORT, echo until EOF
 *   vsock-tool send CID PORT MSG connect to CID:PORT, send MSG, print the reply
 * Built static by build-initramfs. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what) {
    perror(what);
    return 1;
}

static int echo(unsigned port) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1))
        return fail("vsock listen");
    printf("vsock-tool: listening on %u\n", port);
    fflush(stdout);
    int c = accept(l, NULL, NULL);
    if (c < 0)
        return fail("vsock accept");
    char buf[65536];
    long total = 0;
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n <= 0)
            break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(c, buf + off, n - off);
            if (w <= 0)
                return fail("vsock write");
            off += w;
        }
        total += n;
    }
    printf("vsock-tool: echoed %ld bytes\n", total);
    return 0;
}

static int sendmsg_(unsigned cid, unsigned port, const char *msg) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a))
        return fail("vsock connect");
    if (write(s, msg, strlen(msg)) != (ssize_t)strlen(msg))
        return fail("vsock send");
    char buf[4096];
    ssize_t n = read(s, buf, sizeof buf - 1);
    if (n < 0)
        return fail("vsock read");
    buf[n] = 0;
    printf("vsock-tool: reply %s", buf);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "echo"))
        return echo(strtoul(argv[2], NULL, 0));
    if (argc == 5 && !strcmp(argv[1], "send"))
        return sendmsg_(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0), argv[4]);
    fprintf(stderr, "usage: vsock-tool echo PORT | send CID PORT MSG\n");
    return 2;
}
