/* Upscale a PNG x4 with libdeedsr (PNG in and out through libpng's simplified API).
 *
 *   deedsr capi --out /opt/deedsr
 *   cc upscale.c -o upscale $(PKG_CONFIG_PATH=/opt/deedsr pkg-config --cflags --libs deedsr libpng)
 *   ./upscale ENGINE_DIR in.png out.png [--seed N] [--steps N] [--eta X] [--backend auto|ort|trt]
 *
 * Exit status: 0 ok, 2 usage, otherwise 10 + the libdeedsr return code (or 1 for a PNG error).
 */
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deedsr.h>

static int progress(void *user, int32_t step, int32_t steps)
{
    (void)user;
    fprintf(stderr, "\rstep %d/%d", (int)step, (int)steps);
    if (step == steps)
        fputc('\n', stderr);
    return 1; /* 0 would cancel */
}

static int usage(void)
{
    fprintf(stderr, "usage: upscale ENGINE_DIR IN.png OUT.png [--seed N] [--steps N] [--eta X] "
                    "[--backend auto|ort|trt] [--quiet]\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return usage();
    const char *engines = argv[1], *in_path = argv[2], *out_path = argv[3], *backend = "auto";
    deedsr_options opts = {.seed = 0, .steps = 0, .eta = -1.0f, .progress = progress, .user = NULL};
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "--quiet") == 0)
            opts.progress = NULL;
        else if (i + 1 >= argc)
            return usage();
        else if (strcmp(argv[i], "--seed") == 0)
            opts.seed = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--steps") == 0)
            opts.steps = (int32_t)strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--eta") == 0)
            opts.eta = strtof(argv[++i], NULL);
        else if (strcmp(argv[i], "--backend") == 0)
            backend = argv[++i];
        else
            return usage();
    }

    png_image in;
    memset(&in, 0, sizeof in);
    in.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&in, in_path)) {
        fprintf(stderr, "error: %s: %s\n", in_path, in.message);
        return 1;
    }
    in.format = PNG_FORMAT_RGB; /* libpng converts grey, palette and alpha images to 8-bit RGB */
    int32_t width = (int32_t)in.width, height = (int32_t)in.height, stride = width * 3;
    uint8_t *rgb = malloc((size_t)stride * height);
    if (rgb == NULL || !png_image_finish_read(&in, NULL, rgb, stride, NULL)) {
        fprintf(stderr, "error: %s: %s\n", in_path, rgb ? in.message : "out of memory");
        free(rgb);
        return 1;
    }

    deedsr_upscaler *upscaler = NULL;
    int code = deedsr_open(engines, backend, &upscaler);
    if (code != DEEDSR_OK) {
        fprintf(stderr, "error: %s\n", deedsr_last_error());
        free(rgb);
        return 10 + code;
    }
    int32_t out_stride = 4 * width * 3;
    uint8_t *sr = malloc((size_t)out_stride * 4 * height);
    code = sr ? deedsr_upscale(upscaler, rgb, width, height, stride, &opts, sr, out_stride) : DEEDSR_OUT_OF_MEMORY;
    if (code != DEEDSR_OK)
        fprintf(stderr, "error: %s\n", sr ? deedsr_last_error() : "out of memory");
    deedsr_close(upscaler);
    free(rgb);

    int status = code == DEEDSR_OK ? 0 : 10 + code;
    if (code == DEEDSR_OK) { /* write beside the target, then rename: never a half-written PNG */
        png_image out;
        memset(&out, 0, sizeof out);
        out.version = PNG_IMAGE_VERSION;
        out.width = (png_uint_32)(4 * width);
        out.height = (png_uint_32)(4 * height);
        out.format = PNG_FORMAT_RGB;
        size_t n = strlen(out_path) + sizeof ".part";
        char *part = malloc(n);
        int written = part != NULL;
        if (written) {
            snprintf(part, n, "%s.part", out_path);
            written = png_image_write_to_file(&out, part, 0, sr, out_stride, NULL) && rename(part, out_path) == 0;
        }
        if (!written) {
            fprintf(stderr, "error: %s: %s\n", out_path, out.message[0] ? out.message : "cannot write");
            if (part != NULL)
                remove(part);
            status = 1;
        }
        free(part);
    }
    free(sr);
    return status;
}
