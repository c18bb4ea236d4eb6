/*
 * coherent_probe: asks the real kernel (Linux 6.12 + lib/test_hmm.c) what device-COHERENT
 * memory does, step by step, so that tests/hmm/dmirror_coherent_oracle_test.cc can assert
 * the same values on our model. Not built by CMake: it is a static program for the oracle VM.
 *
 * Build and run (../shared/kernel-oracle/README.md; ORACLE_DIR defaults to
 * $HOME/.cache/gpusvm-kernel-oracle; `./run.sh --build-only` first on a fresh machine):
 *
 *   mkdir -p /tmp/oracle-probe
 *   gcc -static -O2 -Wall -I "$HOME/.cache/gpusvm-kernel-oracle/linux-source-6.12" \
 *       tests/hmm/oracle/coherent_probe.c -o /tmp/oracle-probe/coherent_probe
 *   cd ../shared/kernel-oracle      # from the project root
 *   ./run.sh --no-hmm --quiet --log /tmp/oracle-probe/run.log /tmp/oracle-probe/coherent_probe
 *
 * and keep the ===ORACLE-ENV=== block and the part from ===ORACLE-BEGIN coherent_probe=== to
 * ===ORACLE-END coherent_probe...=== as tests/hmm/oracle/coherent_probe-6.12.log, dropping
 * the console noise (tsc/clocksource/stack-depth lines) but keeping test_hmm's own lines.
 *
 * Steps: a-g one 8-page buffer (migrate to unit 2, snapshots through units 2, 3, 0, CPU
 * access, fork + child COW write, READ and MIGRATE_TO_DEV through device-private unit 0,
 * MIGRATE_TO_SYS, mprotect, MADV_DONTNEED, RELEASE); h a 2 MiB THP; i evict-on-close;
 * j unit 3 against unit 2's pages, device WRITE in place, EXCLUSIVE; k MADV_FREE, mremap;
 * l migrations of pages shared with a live child.
 *
 * Devices (test_hmm minors): /dev/hmm_dmirror0, 1 are MEMORY_DEVICE_PRIVATE, 2, 3
 * MEMORY_DEVICE_COHERENT (run.sh: memmap=512M$0x40000000, spm_addr_dev0=0x40000000,
 * spm_addr_dev1=0x50000000).
 *
 * Output: one line per step, "<step> <what>: rc=R cpages=C faults=F [snap=..] [...]".
 *   snap=  one HMM_DMIRROR_PROT_* byte per page in hex (41 = COHERENT_LOCAL|READ,
 *          42 = COHERENT_LOCAL|WRITE, 52 = COHERENT_REMOTE|WRITE, 02 = WRITE (RAM), ...).
 *   pagemap= four characters per page from /proc/self/pagemap:
 *          [0] P present (bit 63), S swap/soft leaf (bit 62), - none;
 *          [1] c pfn inside the coherent SPM range [0x40000000, 0x60000000), r outside, - n/a;
 *          [2] x PM_MMAP_EXCLUSIVE (bit 56: mapped by exactly one process), - not;
 *          [3] f PM_FILE (bit 61: file page or shared anon), - not.
 *   data=  "ok" or the first wrong int.
 * Data pattern: int i of the 8-page buffer holds i; the forked child writes page 4 with
 * 0x40000000 + i (its private COW copy); the parent writes page 5 with -i.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <lib/test_hmm_uapi.h>

#define PAGE 4096UL
#define NPAGES 8
#define INTS_PER_PAGE (PAGE / sizeof(int))
#define TWOMEG (2UL << 20)
#define SPM_START 0x40000000UL
#define SPM_END 0x60000000UL

static int fd0, fd2, fd3;
static int pagemap_fd;
static unsigned char snapbuf[512];
static int mirror[512 * INTS_PER_PAGE];

static int cmd(int fd, unsigned long req, void *addr, void *ptr, unsigned long npages,
	       struct hmm_dmirror_cmd *c)
{
	memset(c, 0, sizeof(*c));
	c->addr = (uintptr_t)addr;
	c->ptr = (uintptr_t)ptr;
	c->npages = npages;
	for (;;) {
		if (ioctl(fd, req, c) == 0)
			return 0;
		if (errno != EINTR)
			return -errno;
	}
}

/* One ioctl line: rc, cpages, faults. */
static int op(const char *step, const char *what, int fd, unsigned long req, void *addr,
	      unsigned long npages)
{
	struct hmm_dmirror_cmd c;
	int rc = cmd(fd, req, addr, mirror, npages, &c);

	printf("%s %s: rc=%d cpages=%llu faults=%llu\n", step, what, rc,
	       (unsigned long long)c.cpages, (unsigned long long)c.faults);
	return rc;
}

static void print_snap(const unsigned char *m, unsigned long n, const unsigned long *idx,
		       unsigned long nidx)
{
	unsigned long i;

	printf(" snap=");
	if (idx) {
		for (i = 0; i < nidx; i++)
			printf("%s[%lu]%02x", i ? "," : "", idx[i], m[idx[i]]);
	} else {
		for (i = 0; i < n; i++)
			printf("%s%02x", i ? "," : "", m[i]);
	}
}

/* SNAPSHOT of npages at addr via fd; idx: pages to print (NULL: all). */
static void snap(const char *step, const char *what, int fd, void *addr, unsigned long npages,
		 const unsigned long *idx, unsigned long nidx)
{
	struct hmm_dmirror_cmd c;
	int rc;

	memset(snapbuf, 0xAA, sizeof(snapbuf));
	rc = cmd(fd, HMM_DMIRROR_SNAPSHOT, addr, snapbuf, npages, &c);
	printf("%s %s: rc=%d cpages=%llu faults=%llu", step, what, rc,
	       (unsigned long long)c.cpages, (unsigned long long)c.faults);
	if (rc == 0)
		print_snap(snapbuf, npages, idx, nidx);
	printf("\n");
}

static void pagemap(const char *step, void *addr, unsigned long npages, const unsigned long *idx,
		    unsigned long nidx)
{
	unsigned long i, n = idx ? nidx : npages;

	printf("%s pagemap:", step);
	for (i = 0; i < n; i++) {
		unsigned long p = idx ? idx[i] : i;
		uint64_t e = 0;
		uint64_t va = (uintptr_t)addr + p * PAGE;
		uint64_t pfn;
		char s[5];

		if (pread(pagemap_fd, &e, 8, (va / PAGE) * 8) != 8) {
			printf(" [%lu]?", p);
			continue;
		}
		pfn = e & ((1ULL << 55) - 1);
		s[0] = (e >> 63) & 1 ? 'P' : (e >> 62) & 1 ? 'S' : '-';
		s[1] = !((e >> 63) & 1) || !pfn ? '-' :
		       (pfn << 12 >= SPM_START && pfn << 12 < SPM_END) ? 'c' : 'r';
		s[2] = (e >> 56) & 1 ? 'x' : '-';
		s[3] = (e >> 61) & 1 ? 'f' : '-';
		s[4] = 0;
		if (idx)
			printf(" [%lu]%s", p, s);
		else
			printf("%s%s", i ? "," : " ", s);
	}
	printf("\n");
}

typedef int (*valfn)(unsigned long i);
static int v_ident(unsigned long i) { return (int)i; }
static int v_child(unsigned long i) { return (int)(0x40000000 + i); }
static int v_neg(unsigned long i) { return -(int)i; }
static int v_zero(unsigned long i) { (void)i; return 0; }

/* Expected value of int i of the 8-page buffer, per page. */
static valfn expect_page[NPAGES];
static int expect(unsigned long i) { return expect_page[i / INTS_PER_PAGE](i); }

/* Checks ints [first, first + n) of p (absolute index i) against f; prints "data=ok". */
static void check(const char *step, const char *what, const int *p, unsigned long first,
		  unsigned long n, valfn f)
{
	unsigned long i;

	for (i = first; i < first + n; i++) {
		if (p[i] != f(i)) {
			printf("%s %s: data=BAD int %lu is %d, expected %d\n", step, what, i, p[i],
			       f(i));
			return;
		}
	}
	printf("%s %s: data=ok\n", step, what);
}

static int *map8(void)
{
	int *p = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		      -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	return p;
}

int main(void)
{
	const unsigned long n = NPAGES;
	int *buf;
	int i, pipefd[2], gofd[2], status;
	char ch;
	pid_t pid;

	setvbuf(stdout, NULL, _IOLBF, 0);
	fd0 = open("/dev/hmm_dmirror0", O_RDWR);
	fd2 = open("/dev/hmm_dmirror2", O_RDWR);
	fd3 = open("/dev/hmm_dmirror3", O_RDWR);
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd0 < 0 || fd2 < 0 || fd3 < 0 || pagemap_fd < 0) {
		perror("open");
		return 1;
	}
	for (i = 0; i < NPAGES; i++)
		expect_page[i] = v_ident;

	/* a. CPU writes i; MIGRATE_TO_DEV via fd2; SNAPSHOT via fd2, fd3, fd0; pagemap. */
	buf = map8();
	for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
		buf[i] = i;
	snap("a", "snapshot-fd2-before", fd2, buf, n, NULL, 0);
	op("a", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	check("a", "mirror", mirror, 0, n * INTS_PER_PAGE, v_ident);
	snap("a", "snapshot-fd2", fd2, buf, n, NULL, 0);
	snap("a", "snapshot-fd3", fd3, buf, n, NULL, 0);
	snap("a", "snapshot-fd0", fd0, buf, n, NULL, 0);
	pagemap("a", buf, n, NULL, 0);

	/* b. CPU reads page 3; SNAPSHOT via fd2 (did anything fault back?). */
	check("b", "cpu-read-page3", buf, 3 * INTS_PER_PAGE, INTS_PER_PAGE, v_ident);
	snap("b", "snapshot-fd2", fd2, buf, n, NULL, 0);
	pagemap("b", buf, n, NULL, 0);

	/* c. fork; the child reads everything and writes page 4 (its COW copy), then waits. */
	if (pipe(pipefd) || pipe(gofd)) {
		perror("pipe");
		return 1;
	}
	pid = fork();
	if (pid == 0) {
		int ok = 1;

		/* The inherited pagemap fd shows the parent's mm: open the child's own. */
		close(pagemap_fd);
		pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
		if (pagemap_fd < 0)
			_exit(5);

		for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
			if (buf[i] != i)
				ok = 0;
		for (i = 4 * INTS_PER_PAGE; i < (int)(5 * INTS_PER_PAGE); i++)
			buf[i] = v_child(i);
		for (i = 4 * INTS_PER_PAGE; i < (int)(5 * INTS_PER_PAGE); i++)
			if (buf[i] != v_child(i))
				ok = 0;
		printf("c child: read-all+write-page4 data=%s\n", ok ? "ok" : "BAD");
		pagemap("c child", buf, n, NULL, 0);
		ch = ok ? 'k' : 'b';
		if (write(pipefd[1], &ch, 1) != 1)
			_exit(3);
		if (read(gofd[0], &ch, 1) != 1)
			_exit(4);
		_exit(ok ? 0 : 2);
	}
	if (read(pipefd[0], &ch, 1) != 1) {
		perror("read");
		return 1;
	}
	snap("c", "snapshot-fd2-child-alive", fd2, buf, n, NULL, 0);
	pagemap("c child-alive", buf, n, NULL, 0);
	if (write(gofd[1], "g", 1) != 1) {
		perror("write");
		return 1;
	}
	waitpid(pid, &status, 0);
	printf("c child-exit: status=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	snap("c", "snapshot-fd2-child-exited", fd2, buf, n, NULL, 0);
	pagemap("c child-exited", buf, n, NULL, 0);
	check("c", "parent-data", buf, 0, n * INTS_PER_PAGE, expect);
	for (i = 5 * INTS_PER_PAGE; i < (int)(6 * INTS_PER_PAGE); i++)
		buf[i] = v_neg(i);
	expect_page[5] = v_neg;
	snap("c", "snapshot-fd2-parent-wrote-page5", fd2, buf, n, NULL, 0);
	pagemap("c parent-wrote-page5", buf, n, NULL, 0);

	/* d. READ via fd0 (a device-private device) of the whole buffer. */
	memset(mirror, 0, sizeof(mirror));
	op("d", "read-fd0", fd0, HMM_DMIRROR_READ, buf, n);
	check("d", "mirror", mirror, 0, n * INTS_PER_PAGE, expect);
	snap("d", "snapshot-fd2", fd2, buf, n, NULL, 0);

	/* e. MIGRATE_TO_DEV via fd0 (private device): coherent pages are not SELECT_SYSTEM. */
	memset(mirror, 0, sizeof(mirror));
	op("e", "migrate_to_dev-fd0", fd0, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	check("e", "mirror", mirror, 0, n * INTS_PER_PAGE, expect);
	snap("e", "snapshot-fd2", fd2, buf, n, NULL, 0);
	snap("e", "snapshot-fd0", fd0, buf, n, NULL, 0);
	pagemap("e", buf, n, NULL, 0);

	/* f. MIGRATE_TO_SYS via fd2. */
	op("f", "migrate_to_sys-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_SYS, buf, n);
	snap("f", "snapshot-fd2", fd2, buf, n, NULL, 0);
	pagemap("f", buf, n, NULL, 0);
	check("f", "cpu-data", buf, 0, n * INTS_PER_PAGE, expect);

	/* g. MIGRATE_TO_DEV via fd2 again; mprotect; MADV_DONTNEED; RELEASE. */
	memset(mirror, 0, sizeof(mirror));
	op("g", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	check("g", "mirror", mirror, 0, n * INTS_PER_PAGE, expect);
	snap("g", "snapshot-fd2", fd2, buf, n, NULL, 0);
	pagemap("g", buf, n, NULL, 0);
	printf("g mprotect-read: rc=%d\n", mprotect(buf, n * PAGE, PROT_READ) ? -errno : 0);
	snap("g", "snapshot-fd2-prot-read", fd2, buf, n, NULL, 0);
	printf("g mprotect-rw: rc=%d\n",
	       mprotect(buf, n * PAGE, PROT_READ | PROT_WRITE) ? -errno : 0);
	snap("g", "snapshot-fd2-prot-rw", fd2, buf, n, NULL, 0);
	printf("g madv_dontneed-pages0-1: rc=%d\n",
	       madvise(buf, 2 * PAGE, MADV_DONTNEED) ? -errno : 0);
	expect_page[0] = v_zero;
	expect_page[1] = v_zero;
	snap("g", "snapshot-fd2-dontneed", fd2, buf, n, NULL, 0);
	pagemap("g dontneed", buf, n, NULL, 0);
	op("g", "release-fd2", fd2, HMM_DMIRROR_RELEASE, buf, n);
	snap("g", "snapshot-fd2-released", fd2, buf, n, NULL, 0);
	pagemap("g released", buf, n, NULL, 0);
	check("g", "cpu-data", buf, 0, n * INTS_PER_PAGE, expect);
	snap("g", "snapshot-fd2-after-cpu-read", fd2, buf, n, NULL, 0);
	munmap(buf, n * PAGE);

	/* h. A 2 MiB-aligned MADV_HUGEPAGE buffer (a THP) migrated to fd2 and back. */
	{
		static const unsigned long idx[] = { 0, 1, 255, 511 };
		const unsigned long hn = TWOMEG / PAGE, ni = sizeof(idx) / sizeof(idx[0]);
		char *raw = mmap(NULL, 2 * TWOMEG, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		int *h;

		if (raw == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		h = (int *)(((uintptr_t)raw + TWOMEG - 1) & ~(TWOMEG - 1));
		printf("h madv_hugepage: rc=%d\n",
		       madvise(h, TWOMEG, MADV_HUGEPAGE) ? -errno : 0);
		for (i = 0; i < (int)(TWOMEG / sizeof(int)); i++)
			h[i] = i;
		snap("h", "snapshot-fd2-thp", fd2, h, hn, idx, ni);
		pagemap("h thp", h, hn, idx, ni);
		op("h", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, h, hn);
		check("h", "mirror", mirror, 0, TWOMEG / sizeof(int), v_ident);
		snap("h", "snapshot-fd2", fd2, h, hn, idx, ni);
		snap("h", "snapshot-fd3", fd3, h, hn, idx, ni);
		pagemap("h", h, hn, idx, ni);
		check("h", "cpu-data", h, 0, TWOMEG / sizeof(int), v_ident);
		op("h", "migrate_to_sys-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_SYS, h, hn);
		snap("h", "snapshot-fd2-back", fd2, h, hn, idx, ni);
		pagemap("h back", h, hn, idx, ni);
		check("h", "cpu-data-back", h, 0, TWOMEG / sizeof(int), v_ident);
		munmap(raw, 2 * TWOMEG);
	}

	/*
	 * i. Closing any fd of a device evicts all of that device's pages (6.12.y backport of
	 *    "evict device pages on file close"): migrate via fd2, open and close a second
	 *    /dev/hmm_dmirror2, SNAPSHOT via fd2.
	 */
	buf = map8();
	for (i = 0; i < NPAGES; i++)
		expect_page[i] = v_ident;
	for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
		buf[i] = i;
	op("i", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	snap("i", "snapshot-fd2", fd2, buf, n, NULL, 0);
	{
		int fdx = open("/dev/hmm_dmirror2", O_RDWR);

		printf("i open-close-second-fd2: open=%s close=%d\n", fdx >= 0 ? "ok" : "failed",
		       fdx >= 0 ? close(fdx) : -1);
	}
	snap("i", "snapshot-fd2-after-close", fd2, buf, n, NULL, 0);
	pagemap("i after-close", buf, n, NULL, 0);
	check("i", "cpu-data", buf, 0, n * INTS_PER_PAGE, expect);
	munmap(buf, n * PAGE);

	/*
	 * j. Two coherent devices: unit 3 meets unit 2's pages (not collected by SELECT_SYSTEM,
	 *    nor by its SELECT_DEVICE_COHERENT); a device WRITE lands in place; EXCLUSIVE on
	 *    coherent pages.
	 */
	buf = map8();
	for (i = 0; i < NPAGES; i++)
		expect_page[i] = v_ident;
	for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
		buf[i] = i;
	op("j", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	op("j", "migrate_to_dev-fd3", fd3, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	snap("j", "snapshot-fd2", fd2, buf, n, NULL, 0);
	snap("j", "snapshot-fd3", fd3, buf, n, NULL, 0);
	op("j", "migrate_to_sys-fd3", fd3, HMM_DMIRROR_MIGRATE_TO_SYS, buf, n);
	snap("j", "snapshot-fd2-after-fd3-to-sys", fd2, buf, n, NULL, 0);
	for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
		mirror[i] = v_child(i);
	op("j", "write-fd3", fd3, HMM_DMIRROR_WRITE, buf, n);
	for (i = 0; i < NPAGES; i++)
		expect_page[i] = v_child;
	snap("j", "snapshot-fd2-after-write", fd2, buf, n, NULL, 0);
	pagemap("j after-write", buf, n, NULL, 0);
	check("j", "cpu-data-after-write", buf, 0, n * INTS_PER_PAGE, expect);
	memset(mirror, 0, sizeof(mirror));
	op("j", "exclusive-fd2", fd2, HMM_DMIRROR_EXCLUSIVE, buf, n);
	check("j", "exclusive-mirror", mirror, 0, n * INTS_PER_PAGE, expect);
	snap("j", "snapshot-fd2-exclusive", fd2, buf, n, NULL, 0);
	snap("j", "snapshot-fd3-exclusive", fd3, buf, n, NULL, 0);
	pagemap("j exclusive", buf, n, NULL, 0);
	op("j", "check_exclusive-fd2", fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, n);
	check("j", "cpu-read-page0", buf, 0, INTS_PER_PAGE, expect);
	snap("j", "snapshot-fd2-cpu-read-page0", fd2, buf, n, NULL, 0);
	op("j", "check_exclusive-fd2-page0", fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, 1);
	op("j", "check_exclusive-fd2-all", fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, n);
	buf[INTS_PER_PAGE] = 77;	/* CPU write to page 1 */
	snap("j", "snapshot-fd2-cpu-write-page1", fd2, buf, n, NULL, 0);
	pagemap("j cpu-write-page1", buf, n, NULL, 0);
	buf[INTS_PER_PAGE] = v_child(INTS_PER_PAGE);
	check("j", "cpu-data-all", buf, 0, n * INTS_PER_PAGE, expect);
	snap("j", "snapshot-fd2-cpu-read-all", fd2, buf, n, NULL, 0);
	pagemap("j cpu-read-all", buf, n, NULL, 0);
	op("j", "check_exclusive-fd2-end", fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, n);
	op("j", "migrate_to_sys-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_SYS, buf, n);
	snap("j", "snapshot-fd2-back", fd2, buf, n, NULL, 0);
	check("j", "cpu-data-back", buf, 0, n * INTS_PER_PAGE, expect);
	munmap(buf, n * PAGE);

	/* k. MADV_FREE and mremap of coherent pages. */
	buf = map8();
	for (i = 0; i < NPAGES; i++)
		expect_page[i] = v_ident;
	for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
		buf[i] = i;
	op("k", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	printf("k madv_free: rc=%d\n", madvise(buf, n * PAGE, MADV_FREE) ? -errno : 0);
	snap("k", "snapshot-fd2-madv-free", fd2, buf, n, NULL, 0);
	pagemap("k madv-free", buf, n, NULL, 0);
	check("k", "cpu-data-madv-free", buf, 0, n * INTS_PER_PAGE, expect);
	{
		/* A destination 8 pages away from anything: map 24, keep the middle 8. */
		char *area = mmap(NULL, 3 * n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		int *dst = (int *)(area + n * PAGE);
		void *r;

		munmap(area, n * PAGE);
		munmap(area + 2 * n * PAGE, n * PAGE);
		r = mremap(buf, n * PAGE, n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
		printf("k mremap: rc=%d\n", r == (void *)dst ? 0 : -errno);
		snap("k", "snapshot-fd2-old-address", fd2, buf, n, NULL, 0);
		snap("k", "snapshot-fd2-new-address", fd2, dst, n, NULL, 0);
		pagemap("k new-address", dst, n, NULL, 0);
		check("k", "cpu-data-new-address", dst, 0, n * INTS_PER_PAGE, expect);
		op("k", "migrate_to_sys-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_SYS, dst, n);
		snap("k", "snapshot-fd2-back", fd2, dst, n, NULL, 0);
		munmap(dst, n * PAGE);
	}

	/*
	 * l. Migrations of pages that a live child maps too (fork sharing, read-only): to RAM,
	 *    back to the device, RELEASE; the child reports its pagemap and data after each.
	 */
	buf = map8();
	for (i = 0; i < NPAGES; i++)
		expect_page[i] = v_ident;
	for (i = 0; i < (int)(n * INTS_PER_PAGE); i++)
		buf[i] = i;
	op("l", "migrate_to_dev-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	if (pipe(pipefd) || pipe(gofd)) {
		perror("pipe");
		return 1;
	}
	pid = fork();
	if (pid == 0) {
		close(pagemap_fd);
		pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
		if (pagemap_fd < 0)
			_exit(5);
		/* Commands from the parent: 'p' report, 'q' exit. */
		while (read(gofd[0], &ch, 1) == 1 && ch == 'p') {
			pagemap("l child", buf, n, NULL, 0);
			check("l", "child-data", buf, 0, n * INTS_PER_PAGE, expect);
			if (write(pipefd[1], "k", 1) != 1)
				_exit(3);
		}
		_exit(0);
	}
#define CHILD_REPORT()							\
	do {								\
		if (write(gofd[1], "p", 1) != 1 || read(pipefd[0], &ch, 1) != 1) { \
			perror("child");				\
			return 1;					\
		}							\
	} while (0)
	CHILD_REPORT();
	snap("l", "snapshot-fd2-forked", fd2, buf, n, NULL, 0);
	pagemap("l forked", buf, n, NULL, 0);
	op("l", "migrate_to_sys-fd2", fd2, HMM_DMIRROR_MIGRATE_TO_SYS, buf, n);
	snap("l", "snapshot-fd2-to-sys", fd2, buf, n, NULL, 0);
	pagemap("l to-sys", buf, n, NULL, 0);
	CHILD_REPORT();
	memset(mirror, 0, sizeof(mirror));
	op("l", "migrate_to_dev-fd2-again", fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, n);
	check("l", "mirror", mirror, 0, n * INTS_PER_PAGE, expect);
	snap("l", "snapshot-fd2-to-dev", fd2, buf, n, NULL, 0);
	pagemap("l to-dev", buf, n, NULL, 0);
	CHILD_REPORT();
	op("l", "release-fd2", fd2, HMM_DMIRROR_RELEASE, buf, n);
	snap("l", "snapshot-fd2-released", fd2, buf, n, NULL, 0);
	pagemap("l released", buf, n, NULL, 0);
	CHILD_REPORT();
	if (write(gofd[1], "q", 1) != 1) {
		perror("write");
		return 1;
	}
	waitpid(pid, &status, 0);
	printf("l child-exit: status=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	check("l", "parent-data", buf, 0, n * INTS_PER_PAGE, expect);
	munmap(buf, n * PAGE);

	close(fd0);
	close(fd2);
	close(fd3);
	printf("done\n");
	return 0;
}
