/*
 * test.h - a minimal libuv-style unit test harness.
 *
 * A test file defines TEST(name) functions and a TEST_LIST; main() runs
 * each test in its own forked process with a timeout, prints one line per
 * test ("ok name" / "FAIL name: ...") and a final "N passed, N failed".
 */
#ifndef RELAY_TEST_H
#define RELAY_TEST_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define TEST(name) static void test_##name(void)

#define ASSERT(cond) do {						\
	if (!(cond)) {							\
		fprintf(stderr, "%s:%d: assertion failed: %s\n",	\
		    __FILE__, __LINE__, #cond);				\
		abort();						\
	}								\
} while (0)

#define ASSERT_EQ(a, b) do {						\
	long long a_ = (long long)(a), b_ = (long long)(b);		\
	if (a_ != b_) {							\
		fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", \
		    __FILE__, __LINE__, #a, #b, a_, b_);		\
		abort();						\
	}								\
} while (0)

#define ASSERT_STR_EQ(a, b) do {					\
	const char *a_ = (a), *b_ = (b);				\
	if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {		\
		fprintf(stderr, "%s:%d: %s == %s failed: \"%s\" != \"%s\"\n", \
		    __FILE__, __LINE__, #a, #b, a_ ? a_ : "(null)",	\
		    b_ ? b_ : "(null)");				\
		abort();						\
	}								\
} while (0)

struct test_entry {
	const char *name;
	void (*fn)(void);
};

#define TEST_ENTRY(name) { #name, test_##name }

/* test_run_all - run every entry in its own process, 30 s timeout each */
static inline int
test_run_all(const char *suite, const struct test_entry *tests, size_t n)
{
	int passed = 0, failed = 0;

	for (size_t i = 0; i < n; i++) {
		fflush(stdout);
		pid_t pid = fork();
		if (pid == 0) {
			alarm(30);
			tests[i].fn();
			fflush(NULL);
			exit(0);	/* exit, not _exit: LeakSanitizer runs at exit */
		}
		int st = 0;
		waitpid(pid, &st, 0);
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
			printf("ok %s.%s\n", suite, tests[i].name);
			passed++;
		} else {
			printf("FAIL %s.%s (%s %d)\n", suite, tests[i].name,
			    WIFSIGNALED(st) ? "signal" : "exit",
			    WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
			failed++;
		}
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}

#define TEST_MAIN(suite, ...)						\
int main(void) {							\
	static const struct test_entry tests_[] = { __VA_ARGS__ };	\
	return test_run_all(suite, tests_,				\
	    sizeof(tests_) / sizeof(tests_[0]));			\
}

#endif
