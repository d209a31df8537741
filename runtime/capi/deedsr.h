/* deedsr.h: the C ABI of libdeedsr, x4 super-resolution with the deedsr runtime.
 *
 * libdeedsr.so starts an embedded Python interpreter of the environment deedsr is installed in
 * (the one `deedsr capi` ran in, or $DEEDSR_PYTHON) on the first call, and calls the runtime's
 * Upscaler; no torch is imported. Every function may be called from any thread; one upscaler
 * may be shared by many threads, with calls running in parallel where the backend allows.
 * Errors never print and never abort: a return code, and deedsr_last_error() for the message.
 */
#ifndef DEEDSR_H
#define DEEDSR_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct deedsr_upscaler deedsr_upscaler;

typedef struct {
    uint64_t seed;
    int32_t  steps;   /* 0: the engine directory's default */
    float    eta;     /* < 0: the default */
    /* Called after every sampling step with step = 1..steps (steps done so far); may be NULL.
       Return 0 to cancel: deedsr_upscale then returns DEEDSR_CANCELLED and leaves out untouched. */
    int32_t (*progress)(void *user, int32_t step, int32_t steps);
    void    *user;
} deedsr_options;

/* Return codes: 0 ok, 1 bad argument, 2 engine directory or backend error,
   3 not enough memory, 4 cancelled, 5 internal error. */
#define DEEDSR_OK 0
#define DEEDSR_BAD_ARGUMENT 1     /* NULL pointer, size outside the engines' range, short stride, bad option */
#define DEEDSR_ENGINE_ERROR 2     /* engine directory missing/corrupt, backend failure, no usable Python environment */
#define DEEDSR_OUT_OF_MEMORY 3    /* the image needs more memory than is available ($DEEDSR_MEMORY_LIMIT) */
#define DEEDSR_CANCELLED 4        /* the progress callback returned 0 */
#define DEEDSR_INTERNAL_ERROR 5   /* anything else; deedsr_last_error() says what */

/* Open an engine directory written by deedsr-export. On success *out is a new upscaler
   (release it with deedsr_close); on failure *out is set to NULL. */
int  deedsr_open(const char *engine_dir, const char *backend /* "auto" | "ort" | "trt" */,
                 deedsr_upscaler **out);

/* rgb: height rows of width*3 bytes (RGB, 8 bit), stride_bytes apart.
   out: caller-owned, 4*height rows of 4*width*3 bytes, out_stride_bytes apart.
   The same bytes as the Python API's Upscaler.upscale(image, seed=opts->seed, ...). out is
   written only on success. */
int  deedsr_upscale(deedsr_upscaler *u, const uint8_t *rgb, int32_t width, int32_t height,
                    int32_t stride_bytes, const deedsr_options *opts /* NULL: defaults, seed 0 */,
                    uint8_t *out, int32_t out_stride_bytes);

/* The calling thread's last error, UTF-8, one line; "" before any failure on this thread.
   Successful calls leave it unchanged. Valid until the next call on this thread. */
const char *deedsr_last_error(void);

/* Release an upscaler (NULL is ignored). No call on it may be running or follow. */
void deedsr_close(deedsr_upscaler *u);

/* The deedsr version the library was built from, e.g. "0.1.0". */
const char *deedsr_version(void);

#ifdef __cplusplus
}
#endif

#endif /* DEEDSR_H */
