// deedsr.hpp: a small C++17 RAII wrapper over libdeedsr's C ABI (deedsr.h).
//
//   deedsr::Upscaler up("ENGINE_DIR");                  // throws deedsr::Error
//   std::vector<uint8_t> sr = up.upscale(rgb, width, height, {.seed = 1});
//
// One Upscaler may be shared by many threads (upscale is const); it is closed when the last
// owner goes away. Copying is disabled, moving transfers ownership.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <deedsr.h>

namespace deedsr {

class Error : public std::runtime_error {
public:
    Error(int code, const std::string &message) : std::runtime_error(message), code_(code) {}
    int code() const noexcept { return code_; }  // DEEDSR_BAD_ARGUMENT ... DEEDSR_INTERNAL_ERROR

private:
    int code_;
};

struct Options {
    uint64_t seed = 0;
    int32_t steps = 0;   // 0: the engine directory's default
    float eta = -1.0f;   // < 0: the default
    std::function<bool(int step, int steps)> progress;  // return false to cancel
};

class Upscaler {
public:
    explicit Upscaler(const std::string &engine_dir, const std::string &backend = "auto") {
        check(deedsr_open(engine_dir.c_str(), backend.c_str(), &handle_));
    }
    ~Upscaler() { deedsr_close(handle_); }
    Upscaler(const Upscaler &) = delete;
    Upscaler &operator=(const Upscaler &) = delete;
    Upscaler(Upscaler &&other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Upscaler &operator=(Upscaler &&other) noexcept {
        if (this != &other) {
            deedsr_close(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }

    // rgb: height rows of width*3 bytes, tightly packed. Returns 4*height rows of 4*width*3 bytes.
    std::vector<uint8_t> upscale(const uint8_t *rgb, int32_t width, int32_t height,
                                 const Options &options = {}) const {
        if (width <= 0 || height <= 0)
            throw Error(DEEDSR_BAD_ARGUMENT, "image is " + std::to_string(width) + "x" +
                                                 std::to_string(height) + "; width and height must be positive");
        std::vector<uint8_t> out(size_t(4 * width) * 3 * size_t(4 * height));
        deedsr_options opts{options.seed, options.steps, options.eta, nullptr, nullptr};
        if (options.progress) {
            opts.progress = &Upscaler::on_progress;
            opts.user = const_cast<std::function<bool(int, int)> *>(&options.progress);
        }
        check(deedsr_upscale(handle_, rgb, width, height, width * 3, &opts, out.data(), 4 * width * 3));
        return out;
    }

    static std::string version() { return deedsr_version(); }

private:
    static int32_t on_progress(void *user, int32_t step, int32_t steps) {
        try {  // an exception must not unwind through the C library
            return (*static_cast<std::function<bool(int, int)> *>(user))(step, steps) ? 1 : 0;
        } catch (...) {
            return 0;
        }
    }
    static void check(int code) {
        if (code != DEEDSR_OK)
            throw Error(code, deedsr_last_error());
    }

    deedsr_upscaler *handle_ = nullptr;
};

}  // namespace deedsr
