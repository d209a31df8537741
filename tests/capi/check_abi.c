/* Test driver for libdeedsr (tests/test_capi.py): reaches every return code of deedsr.h from C
 * and prints one line per case, "case<TAB>code<TAB>message", for the test to assert on.
 *
 *   check_abi errors ENGINES CORRUPT_ENGINES BAD_SAMPLER_ENGINES
 *   check_abi once ENGINES      (open + one 32x24 upscale; run with a changed environment)
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deedsr.h>

#define W 32
#define H 24
static uint8_t image[H][W * 3];

static void report(const char *name, int code)
{
    printf("%s\t%d\t%s\n", name, code, code ? deedsr_last_error() : "");
    fflush(stdout);
}

static int cancel_at_first(void *user, int32_t step, int32_t steps)
{
    (void)steps;
    *(int *)user = step;
    return 0;
}

static int count_steps(void *user, int32_t step, int32_t steps)
{
    int *seen = user; /* seen[0]: calls, seen[1]: last step, seen[2]: steps */
    seen[0]++;
    seen[1] = step;
    seen[2] = steps;
    return 1;
}

static void *fresh_thread_error(void *arg)
{
    (void)arg;
    printf("fresh_thread_error\t0\t[%s]\n", deedsr_last_error()); /* this thread never failed */
    deedsr_upscaler *u;
    report("thread_open_missing", deedsr_open("/nonexistent/thread", "ort", &u));
    return NULL;
}

static int errors(const char *engines, const char *corrupt, const char *bad_sampler)
{
    static uint8_t out[4 * H][4 * W * 3], again[4 * H][4 * W * 3];
    deedsr_upscaler *u = NULL, *v = NULL;
    printf("version\t0\t%s\n", deedsr_version());

    report("open_null_out", deedsr_open(engines, "ort", NULL));
    report("open_null_dir", deedsr_open(NULL, "ort", &u));
    report("open_null_backend", deedsr_open(engines, NULL, &u));
    report("open_unknown_backend", deedsr_open(engines, "cuda", &u));
    printf("failed_open_sets_null\t0\t%d\n", u == NULL);
    report("open_missing", deedsr_open("/nonexistent/engines", "ort", &u));
    report("open_corrupt", deedsr_open(corrupt, "auto", &u));
    report("open", deedsr_open(engines, "ort", &u));
    if (u == NULL)
        return 1;

    deedsr_options opts = {.seed = 3, .steps = 2, .eta = -1.0f, .progress = NULL, .user = NULL};
    report("upscale_null_upscaler", deedsr_upscale(NULL, &image[0][0], W, H, W * 3, &opts, &out[0][0], 4 * W * 3));
    report("upscale_null_rgb", deedsr_upscale(u, NULL, W, H, W * 3, &opts, &out[0][0], 4 * W * 3));
    report("upscale_null_out", deedsr_upscale(u, &image[0][0], W, H, W * 3, &opts, NULL, 4 * W * 3));
    report("upscale_zero_width", deedsr_upscale(u, &image[0][0], 0, H, W * 3, &opts, &out[0][0], 4 * W * 3));
    report("upscale_short_stride", deedsr_upscale(u, &image[0][0], W, H, W * 3 - 1, &opts, &out[0][0], 4 * W * 3));
    report("upscale_short_out_stride", deedsr_upscale(u, &image[0][0], W, H, W * 3, &opts, &out[0][0], 4 * W * 3 - 3));
    report("upscale_too_small", deedsr_upscale(u, &image[0][0], 8, 8, W * 3, &opts, &out[0][0], 4 * W * 3));
    uint8_t *big = calloc(1, (size_t)200 * 200 * 3), *big_out = calloc(1, (size_t)800 * 800 * 3);
    report("upscale_too_large", deedsr_upscale(u, big, 200, 200, 200 * 3, &opts, big_out, 800 * 3));
    free(big);
    free(big_out);
    deedsr_options bad = opts;
    bad.steps = -1;
    report("upscale_negative_steps", deedsr_upscale(u, &image[0][0], W, H, W * 3, &bad, &out[0][0], 4 * W * 3));
    bad = opts;
    bad.eta = 2.0f;
    report("upscale_eta_above_one", deedsr_upscale(u, &image[0][0], W, H, W * 3, &bad, &out[0][0], 4 * W * 3));

    memset(out, 0xAB, sizeof out);
    int cancelled_at = 0;
    deedsr_options cancel = opts;
    cancel.progress = cancel_at_first;
    cancel.user = &cancelled_at;
    report("upscale_cancel", deedsr_upscale(u, &image[0][0], W, H, W * 3, &cancel, &out[0][0], 4 * W * 3));
    int untouched = 1;
    for (size_t i = 0; i < sizeof out; i++)
        untouched &= (&out[0][0])[i] == 0xAB;
    printf("cancel_step\t0\t%d untouched=%d\n", cancelled_at, untouched);

    pthread_t thread;
    pthread_create(&thread, NULL, fresh_thread_error, NULL);
    pthread_join(thread, NULL);
    printf("main_error_kept\t0\t%s\n", deedsr_last_error()); /* still the cancel message */

    int seen[3] = {0, 0, 0};
    deedsr_options counted = opts;
    counted.steps = 3;
    counted.progress = count_steps;
    counted.user = seen;
    report("upscale_progress", deedsr_upscale(u, &image[0][0], W, H, W * 3, &counted, &out[0][0], 4 * W * 3));
    printf("progress_calls\t0\t%d %d %d\n", seen[0], seen[1], seen[2]);

    report("upscale", deedsr_upscale(u, &image[0][0], W, H, W * 3, &opts, &out[0][0], 4 * W * 3));
    deedsr_close(u);
    deedsr_close(NULL);
    report("reopen", deedsr_open(engines, "ort", &u));
    report("upscale_after_reopen", deedsr_upscale(u, &image[0][0], W, H, W * 3, &opts, &again[0][0], 4 * W * 3));
    printf("reopen_same_image\t0\t%d\n", memcmp(out, again, sizeof out) == 0);
    deedsr_close(u);

    report("open_bad_sampler", deedsr_open(bad_sampler, "ort", &v));
    if (v != NULL) {
        report("upscale_internal_error", deedsr_upscale(v, &image[0][0], W, H, W * 3, NULL, &out[0][0], 4 * W * 3));
        deedsr_close(v);
    }
    return 0;
}

static int once(const char *engines)
{
    static uint8_t out[4 * H][4 * W * 3];
    deedsr_upscaler *u = NULL;
    int code = deedsr_open(engines, "ort", &u);
    report("open", code);
    if (code == 0) {
        deedsr_options opts = {.seed = 0, .steps = 2, .eta = -1.0f, .progress = NULL, .user = NULL};
        report("upscale", deedsr_upscale(u, &image[0][0], W, H, W * 3, &opts, &out[0][0], 4 * W * 3));
        deedsr_close(u);
    }
    return 0;
}

int main(int argc, char **argv)
{
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W * 3; x++)
            image[y][x] = (uint8_t)(x * 5 + y * 9);
    if (argc == 5 && strcmp(argv[1], "errors") == 0)
        return errors(argv[2], argv[3], argv[4]);
    if (argc == 3 && strcmp(argv[1], "once") == 0)
        return once(argv[2]);
    fprintf(stderr, "usage: check_abi errors ENGINES CORRUPT BAD_SAMPLER | check_abi once ENGINES\n");
    return 2;
}
