/* The C half of libdeedsr: the public functions of deedsr.h. They check what C can check
 * (pointers, sizes, strides), start the embedded interpreter once, and call the Python half
 * (deedsr.runtime.capi.bindings) through cffi's extern "Python" functions _deedsr_py_*.
 *
 * cffi would start Python itself with Py_InitializeEx(), which finds its environment from the
 * host program's name and PYTHON* variables, prints to stderr and aborts the process when that
 * fails. We start it first, with PyConfig: the interpreter of the environment deedsr is
 * installed in (recorded at build time, or $DEEDSR_PYTHON), the host's PYTHON* variables
 * ignored, no signal handlers, and a failure returned as a status rather than an abort.
 *
 * Built by build.py, which defines DEEDSR_BUILD_PYTHON and DEEDSR_VERSION_STRING above this.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "deedsr.h"

typedef int32_t (*deedsr_progress_fn)(void *user, int32_t step, int32_t steps);

/* extern "Python" functions, defined by cffi further down this file. */
int _deedsr_py_open(const char *engine_dir, const char *backend, uint64_t *handle);
int _deedsr_py_upscale(uint64_t handle, const uint8_t *rgb, int32_t width, int32_t height,
                       int32_t stride_bytes, uint64_t seed, int32_t steps, float eta,
                       deedsr_progress_fn progress, void *user, uint8_t *out, int32_t out_stride_bytes);
void _deedsr_py_close(uint64_t handle);

struct deedsr_upscaler {
    uint64_t handle; /* key of the Python half's table of Upscalers */
};

#define ERROR_BYTES 1024
static __thread char last_error[ERROR_BYTES];

/* Copy at most ERROR_BYTES-1 bytes, cut at a UTF-8 character boundary, newlines as spaces. */
static void store_error(char *dst, const char *message)
{
    size_t n = strlen(message);
    if (n > ERROR_BYTES - 1) {
        n = ERROR_BYTES - 1;
        while (n > 0 && ((unsigned char)message[n] & 0xC0) == 0x80)
            n--;
    }
    for (size_t i = 0; i < n; i++)
        dst[i] = (message[i] == '\n' || message[i] == '\r') ? ' ' : message[i];
    dst[n] = '\0';
}

/* Called by the Python half (declared in the cffi cdef) on the calling thread. */
void _deedsr_set_error(const char *message)
{
    store_error(last_error, message ? message : "");
}

static int fail(int code, const char *format, ...)
{
    char buffer[ERROR_BYTES * 2];
    va_list args;
    va_start(args, format);
    vsnprintf(buffer, sizeof buffer, format, args);
    va_end(args);
    store_error(last_error, buffer);
    return code;
}

/* ------------------------------------------------------------- the interpreter */
static pthread_once_t python_once = PTHREAD_ONCE_INIT;
static char python_error[ERROR_BYTES]; /* "" once Python and the bindings are usable */
static int python_owned;               /* 1 when this library started the interpreter */

int _deedsr_owns_python(void)
{
    return python_owned;
}

static const char *environment_python(void)
{
    const char *python = getenv("DEEDSR_PYTHON");
    return (python && *python) ? python : DEEDSR_BUILD_PYTHON;
}

/* The exception being raised, as "Type: message", into python_error; clears it. GIL held. */
static void store_python_exception(const char *context)
{
    PyObject *type, *value, *traceback;
    char detail[ERROR_BYTES] = "unknown error";
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL) {
        PyObject *text = PyObject_Str(value);
        const char *utf8 = text ? PyUnicode_AsUTF8(text) : NULL;
        snprintf(detail, sizeof detail, "%s: %s", Py_TYPE(value)->tp_name, utf8 ? utf8 : "?");
        Py_XDECREF(text);
    }
    PyErr_Clear();
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    char buffer[ERROR_BYTES * 2];
    snprintf(buffer, sizeof buffer, "%s (%s)", context, detail);
    store_error(python_error, buffer);
}

/* Import what the cffi module's init code imports, so that a missing package becomes our error
   message instead of cffi's report on stderr. GIL held. */
static void check_environment(void)
{
    static const char *modules[] = {"_cffi_backend", "numpy", "deedsr.runtime.capi.bindings"};
    for (size_t i = 0; i < sizeof modules / sizeof *modules; i++) {
        PyObject *module = PyImport_ImportModule(modules[i]);
        if (module == NULL) {
            char context[ERROR_BYTES];
            snprintf(context, sizeof context,
                     "the Python environment of %s cannot import %s; install deedsr[capi] there or set "
                     "DEEDSR_PYTHON to the python of an environment that has it",
                     Py_IsInitialized() && python_owned ? environment_python() : "this process", modules[i]);
            store_python_exception(context);
            return;
        }
        Py_DECREF(module);
    }
}

static void start_python(void)
{
    if (Py_IsInitialized()) { /* the host embeds Python already: use its interpreter */
        PyGILState_STATE state = PyGILState_Ensure();
        check_environment();
        PyGILState_Release(state);
        return;
    }
    const char *python = environment_python();
    if (access(python, X_OK) != 0) {
        snprintf(python_error, sizeof python_error,
                 "%s is not an executable Python interpreter; set DEEDSR_PYTHON to the python of the "
                 "environment deedsr is installed in", python);
        return;
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.use_environment = 0;         /* the host's PYTHONHOME/PYTHONPATH are not ours */
    config.install_signal_handlers = 0; /* signals belong to the host */
    config.parse_argv = 0;
    config.configure_c_stdio = 0;
    /* As if `python` were run: getpath finds the standard library and a venv's pyvenv.cfg from it. */
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.executable, python);
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        snprintf(python_error, sizeof python_error, "cannot start the Python interpreter %s: %s%s%s", python,
                 status.func ? status.func : "", status.func ? ": " : "",
                 status.err_msg ? status.err_msg : (PyStatus_IsExit(status) ? "it exited" : "failed"));
        return;
    }
    python_owned = 1;
    check_environment();
    PyEval_SaveThread(); /* release the GIL; calls take it with PyGILState_Ensure */
}

/* 0 when the bindings can be called, else sets the thread's error and returns its code. */
static int ready(void)
{
    pthread_once(&python_once, start_python);
    if (python_error[0] != '\0')
        return fail(DEEDSR_ENGINE_ERROR, "%s", python_error);
    if (cffi_start_python() != 0)
        return fail(DEEDSR_INTERNAL_ERROR, "the embedded deedsr module failed to initialise");
    return 0;
}

/* ------------------------------------------------------------------ the ABI */
const char *deedsr_version(void)
{
    return DEEDSR_VERSION_STRING;
}

const char *deedsr_last_error(void)
{
    return last_error;
}

int deedsr_open(const char *engine_dir, const char *backend, deedsr_upscaler **out)
{
    if (out == NULL)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_open: out is NULL");
    *out = NULL;
    if (engine_dir == NULL)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_open: engine_dir is NULL");
    if (backend == NULL)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_open: backend is NULL; pass \"auto\", \"ort\" or \"trt\"");
    int code = ready();
    if (code != 0)
        return code;
    deedsr_upscaler *u = malloc(sizeof *u);
    if (u == NULL)
        return fail(DEEDSR_OUT_OF_MEMORY, "deedsr_open: out of memory");
    code = _deedsr_py_open(engine_dir, backend, &u->handle);
    if (code != 0) {
        free(u);
        return code;
    }
    *out = u;
    return 0;
}

int deedsr_upscale(deedsr_upscaler *u, const uint8_t *rgb, int32_t width, int32_t height,
                   int32_t stride_bytes, const deedsr_options *opts, uint8_t *out, int32_t out_stride_bytes)
{
    if (u == NULL)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: the upscaler is NULL");
    if (rgb == NULL)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: rgb is NULL");
    if (out == NULL)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: out is NULL");
    if (width <= 0 || height <= 0)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: image is %dx%d; width and height must be positive",
                    (int)width, (int)height);
    int64_t row = (int64_t)width * 3, out_row = (int64_t)width * 4 * 3;
    if (stride_bytes < row)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: stride_bytes is %d, less than a row of %lld bytes "
                    "(width %d x 3)", (int)stride_bytes, (long long)row, (int)width);
    if (out_stride_bytes < out_row)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: out_stride_bytes is %d, less than an output row of "
                    "%lld bytes (4 x width %d x 3)", (int)out_stride_bytes, (long long)out_row, (int)width);
    deedsr_options defaults = {0, 0, -1.0f, NULL, NULL};
    if (opts == NULL)
        opts = &defaults;
    if (opts->steps < 0)
        return fail(DEEDSR_BAD_ARGUMENT, "deedsr_upscale: steps is %d; pass 0 for the default or a positive count",
                    (int)opts->steps);
    int code = ready();
    if (code != 0)
        return code;
    return _deedsr_py_upscale(u->handle, rgb, width, height, stride_bytes, opts->seed, opts->steps, opts->eta,
                              opts->progress, opts->user, out, out_stride_bytes);
}

void deedsr_close(deedsr_upscaler *u)
{
    if (u == NULL)
        return;
    if (ready() == 0)
        _deedsr_py_close(u->handle);
    free(u);
}
