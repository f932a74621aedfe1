/* vsock-tool: the initramfs's vsock helper (busybox has none).
 *   vsock-tool echo PORT         accept one connection on PORT, echo until EOF
 *   vsock-tool send CID PORT MSG connect to CID:PORT, send MSG, print the reply
 *   vsock-tool agent PORT [HOOK] the guest agent ffmk-vmm asks to let go of a
 *                                passthrough function before it is unplugged
 *                                and to look for new ones after a plug
 *                                (docs/vfio.md): one command line per
 *                                connection, one answer line:
 *       detach 0000:00:05.0  ->  ok detached 0000:00:05.0 | error ...
 *       rescan               ->  ok rescanned 0000:00:01.0=1af4:1044 ...
 *                                HOOK (a shell script) runs as `sh HOOK detach
 *                                BDF` before a detach (a non-zero exit refuses
 *                                it: the MPI runtime is not ready to let go)
 *                                and `sh HOOK rescanned` after a rescan (new
 *                                functions may have come: reconnect).
 * Built static by build-initramfs. */
#include <dirent.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
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

static int write_sysfs(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    int ok = fputs("1\n", f) >= 0;
    return (fclose(f) == 0 && ok) ? 0 : -1;
}

static void read_id(const char *dev, const char *file, char *out, size_t len) {
    char path[320];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/%s", dev, file);
    FILE *f = fopen(path, "r");
    out[0] = 0;
    if (!f)
        return;
    if (fgets(out, (int)len, f))
        out[strcspn(out, "\n")] = 0;
    fclose(f);
}

/* Appends " BDF=vendor:device" for every PCI function to out. */
static void list_functions(char *out, size_t len) {
    DIR *d = opendir("/sys/bus/pci/devices");
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char vendor[16], device[16], item[300];
        read_id(e->d_name, "vendor", vendor, sizeof vendor);
        read_id(e->d_name, "device", device, sizeof device);
        snprintf(item, sizeof item, " %s=%s:%s", e->d_name, vendor + (vendor[0] == '0' ? 2 : 0),
                 device + (device[0] == '0' ? 2 : 0));
        if (strlen(out) + strlen(item) + 2 < len)
            strcat(out, item);
    }
    closedir(d);
}

/* Runs `sh hook action arg`; its exit status (0 without a hook, -1 if it
 * could not run). */
static int run_hook(const char *hook, const char *action, const char *arg) {
    if (!hook)
        return 0;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        execl("/bin/sh", "sh", hook, action, arg, (char *)NULL);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status))
        return -1;
    return WEXITSTATUS(status);
}

static int agent(unsigned port, const char *hook) {
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4))
        return fail("vsock listen");
    printf("vsock-tool: agent on %u\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0)
            return fail("vsock accept");
        char cmd[256] = {0}, reply[4096] = {0}, path[300];
        ssize_t n = read(c, cmd, sizeof cmd - 1);
        if (n <= 0) {
            close(c);
            continue;
        }
        cmd[strcspn(cmd, "\r\n")] = 0;
        const char *bdf = cmd + 7;
        if (!strncmp(cmd, "detach ", 7) && strlen(bdf) == 12 && !strchr(bdf, '/')) {
            snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/remove", bdf);
            int refused;
            if (access(path, F_OK) != 0)
                snprintf(reply, sizeof reply, "ok detached %s (not present)\n", bdf);
            else if ((refused = run_hook(hook, "detach", bdf)) != 0)
                snprintf(reply, sizeof reply, "error the hook refused to let go of %s (exit %d)\n",
                         bdf, refused);
            else if (write_sysfs(path) == 0)
                snprintf(reply, sizeof reply, "ok detached %s\n", bdf);
            else
                snprintf(reply, sizeof reply, "error cannot remove %s\n", bdf);
        } else if (!strcmp(cmd, "rescan")) {
            if (write_sysfs("/sys/bus/pci/rescan") == 0) {
                strcpy(reply, "ok rescanned");
                list_functions(reply, sizeof reply - 2);
                strcat(reply, "\n");
                int h = run_hook(hook, "rescanned", "");
                if (h != 0)
                    printf("vsock-tool: agent: hook rescanned: exit %d\n", h);
            } else {
                strcpy(reply, "error cannot rescan\n");
            }
        } else {
            snprintf(reply, sizeof reply, "error unknown command (detach BDF | rescan)\n");
        }
        printf("vsock-tool: agent: %s -> %s", cmd, reply);
        fflush(stdout);
        if (write(c, reply, strlen(reply)) < 0)
            perror("vsock agent reply");
        close(c);
    }
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "echo"))
        return echo(strtoul(argv[2], NULL, 0));
    if (argc == 5 && !strcmp(argv[1], "send"))
        return sendmsg_(strtoul(argv[2], NULL, 0), strtoul(argv[3], NULL, 0), argv[4]);
    if ((argc == 3 || argc == 4) && !strcmp(argv[1], "agent"))
        return agent(strtoul(argv[2], NULL, 0), argc == 4 ? argv[3] : NULL);
    fprintf(stderr, "usage: vsock-tool echo PORT | send CID PORT MSG | agent PORT [HOOK]\n");
    return 2;
}
