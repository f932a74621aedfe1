/*
 * ffmk-mpi-checksum: an MPI job whose result is a checksum of its whole
 * computation, for checking that migrating or checkpointing its VMs changes
 * nothing. Every rank holds WORDS 64-bit words; each step every rank mixes
 * its words, passes them to the next rank around a ring (MPI_Sendrecv),
 * folds in what it got from the previous one, and all ranks combine a hash
 * of their words (MPI_Allreduce), which feeds a running checksum. The result
 * depends only on the number of ranks and the arguments, never on timing or
 * placement: a run that was moved or restarted from a checkpoint must print
 * the same checksum as one that was not.
 *
 *   ffmk-mpi-checksum [STEPS [WORDS [PAUSE_MS [EVERY [NAP_US]]]]]
 *     STEPS     steps (default 100)
 *     WORDS     words per rank (default 65536: 512 KiB)
 *     PAUSE_MS  sleep after each step, so that a run lasts long enough to
 *               be interrupted on a fast host (default 0)
 *     EVERY     rank 0 prints "step K/STEPS checksum=X" every EVERY steps
 *               (default 10)
 *     NAP_US    while a rank waits for its peers it sleeps this long between
 *               looks (MPI_Testall) instead of spinning in MPI (default 0:
 *               MPI_Waitall, which spins): a vCPU that waits then halts, as
 *               in a guest that blocks. The result is the same either way.
 * Rank 0 prints where every rank runs ("rank R on HOST pid P") first and
 * "ffmk-mpi-checksum: ranks=N steps=S words=W checksum=X" last.
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* Waits for `n` requests: in MPI (spinning), or napping `nap_us` between looks. */
static void wait_all(int n, MPI_Request *req, long nap_us)
{
    if (nap_us <= 0) {
        MPI_Waitall(n, req, MPI_STATUSES_IGNORE);
        return;
    }
    struct timespec ts = {nap_us / 1000000, (nap_us % 1000000) * 1000L};
    for (;;) {
        int done = 0;
        MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE);
        if (done)
            return;
        nanosleep(&ts, NULL);
    }
}

static long arg(int argc, char **argv, int i, long dflt, long min)
{
    if (argc <= i)
        return dflt;
    char *end;
    long v = strtol(argv[i], &end, 10);
    if (*end != '\0' || v < min) {
        fprintf(stderr, "ffmk-mpi-checksum: bad argument %d: '%s' (a number >= %ld)\n", i, argv[i], min);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return v;
}

int main(int argc, char **argv)
{
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long steps = arg(argc, argv, 1, 100, 1);
    long words = arg(argc, argv, 2, 65536, 1);
    long pause_ms = arg(argc, argv, 3, 0, 0);
    long every = arg(argc, argv, 4, 10, 1);
    long nap_us = arg(argc, argv, 5, 0, 0);

    char host[MPI_MAX_PROCESSOR_NAME] = {0};
    int len;
    MPI_Get_processor_name(host, &len);
    char *hosts = rank == 0 ? malloc((size_t)size * MPI_MAX_PROCESSOR_NAME) : NULL;
    long pid = getpid(), *pids = rank == 0 ? malloc((size_t)size * sizeof(long)) : NULL;
    MPI_Gather(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, hosts, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Gather(&pid, 1, MPI_LONG, pids, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (int r = 0; r < size; r++)
            printf("rank %d on %s pid %ld\n", r, hosts + (size_t)r * MPI_MAX_PROCESSOR_NAME, pids[r]);
        fflush(stdout);
    }

    uint64_t *mine = malloc((size_t)words * sizeof(uint64_t));
    uint64_t *got = malloc((size_t)words * sizeof(uint64_t));
    if (!mine || !got) {
        fprintf(stderr, "ffmk-mpi-checksum: out of memory for %ld words\n", words);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (long i = 0; i < words; i++)
        mine[i] = mix((uint64_t)rank * (uint64_t)words + (uint64_t)i + 1);
    int next = (rank + 1) % size, prev = (rank + size - 1) % size;
    uint64_t checksum = 0;
    for (long k = 1; k <= steps; k++) {
        for (long i = 0; i < words; i++)
            mine[i] = mix(mine[i] ^ (uint64_t)k);
        MPI_Request ring[2];
        MPI_Irecv(got, (int)words, MPI_UINT64_T, prev, 0, MPI_COMM_WORLD, &ring[0]);
        MPI_Isend(mine, (int)words, MPI_UINT64_T, next, 0, MPI_COMM_WORLD, &ring[1]);
        wait_all(2, ring, nap_us);
        uint64_t h = 0;
        for (long i = 0; i < words; i++) {
            mine[i] ^= (got[i] << 17) | (got[i] >> 47);
            h = mix(h ^ mine[i]);
        }
        uint64_t all = 0;
        /* XOR of per-rank hashes mixed with the rank: order-free, rank-aware. */
        h = mix(h + (uint64_t)rank);
        MPI_Request reduce;
        MPI_Iallreduce(&h, &all, 1, MPI_UINT64_T, MPI_BXOR, MPI_COMM_WORLD, &reduce);
        wait_all(1, &reduce, nap_us);
        checksum = mix(checksum ^ all);
        if (rank == 0 && (k % every == 0 || k == steps)) {
            printf("step %ld/%ld checksum=%016llx\n", k, steps, (unsigned long long)checksum);
            fflush(stdout);
        }
        if (pause_ms > 0) {
            struct timespec ts = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    if (rank == 0) {
        printf("ffmk-mpi-checksum: ranks=%d steps=%ld words=%ld checksum=%016llx\n", size, steps, words,
               (unsigned long long)checksum);
        fflush(stdout);
    }
    free(mine);
    free(got);
    free(hosts);
    free(pids);
    MPI_Finalize();
    return 0;
}
