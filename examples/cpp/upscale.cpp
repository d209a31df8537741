// Upscale a binary PPM (P6) x4 with libdeedsr through the RAII wrapper in deedsr.hpp, from
// several threads sharing one upscaler: thread i uses seed SEED+i and writes OUT_PREFIX-i.ppm.
//
//   c++ -std=c++17 upscale.cpp -o upscale-cpp $(PKG_CONFIG_PATH=/opt/deedsr pkg-config --cflags --libs deedsr) -pthread
//   ./upscale-cpp ENGINE_DIR in.ppm OUT_PREFIX [--threads N] [--seed N] [--steps N] [--images-per-thread K]
//                 [--warmup 1]
//
// Prints the time to open (the first open also starts the embedded interpreter) and the images
// per second over all threads (after --warmup images on one thread, not timed).
// Exit status: 0 ok, 2 usage, 10 + code on a libdeedsr error, 1 on a file error.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "deedsr.hpp"

struct Image {
    int32_t width = 0, height = 0;
    std::vector<uint8_t> rgb;
};

static Image read_ppm(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    std::string magic;
    int maxval = 0;
    Image image;
    if (!(f >> magic >> image.width >> image.height >> maxval) || magic != "P6" || maxval != 255 ||
        image.width <= 0 || image.height <= 0)
        throw std::runtime_error(path + ": not an 8-bit binary PPM (P6)");
    f.get();  // the one whitespace byte before the pixels
    image.rgb.resize(size_t(image.width) * image.height * 3);
    if (!f.read(reinterpret_cast<char *>(image.rgb.data()), std::streamsize(image.rgb.size())))
        throw std::runtime_error(path + ": truncated");
    return image;
}

static void write_ppm(const std::string &path, const uint8_t *rgb, int32_t width, int32_t height) {
    const std::string part = path + ".part";  // then rename: never a half-written file
    {
        std::ofstream f(part, std::ios::binary);
        f << "P6\n" << width << " " << height << "\n255\n";
        f.write(reinterpret_cast<const char *>(rgb), std::streamsize(size_t(width) * height * 3));
        if (!f)
            throw std::runtime_error(part + ": cannot write");
    }
    if (std::rename(part.c_str(), path.c_str()) != 0)
        throw std::runtime_error(path + ": cannot write");
}

int main(int argc, char **argv) {
    if (argc < 4) {
        std::cerr << "usage: upscale-cpp ENGINE_DIR in.ppm OUT_PREFIX [--threads N] [--seed N] [--steps N] "
                     "[--images-per-thread K]\n";
        return 2;
    }
    int threads = 1, per_thread = 1, warmup = 0;
    deedsr::Options base;
    for (int i = 4; i + 1 < argc; i += 2) {
        std::string flag = argv[i];
        if (flag == "--threads") threads = std::stoi(argv[i + 1]);
        else if (flag == "--seed") base.seed = std::stoull(argv[i + 1]);
        else if (flag == "--steps") base.steps = std::stoi(argv[i + 1]);
        else if (flag == "--images-per-thread") per_thread = std::stoi(argv[i + 1]);
        else if (flag == "--warmup") warmup = std::stoi(argv[i + 1]);
        else { std::cerr << "unknown option " << flag << "\n"; return 2; }
    }
    try {
        const Image image = read_ppm(argv[2]);
        const auto opening = std::chrono::steady_clock::now();
        const deedsr::Upscaler upscaler(argv[1], "auto");
        std::printf("open: %.3f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - opening).count());
        for (int k = 0; k < warmup; k++)
            upscaler.upscale(image.rgb.data(), image.width, image.height, base);
        std::vector<std::vector<uint8_t>> results(threads);
        std::vector<std::thread> pool;
        std::atomic<int> failed{0};
        std::string first_error;
        const auto started = std::chrono::steady_clock::now();
        for (int t = 0; t < threads; t++) {
            pool.emplace_back([&, t] {
                deedsr::Options options = base;
                options.seed = base.seed + uint64_t(t);
                try {
                    for (int k = 0; k < per_thread; k++)
                        results[t] = upscaler.upscale(image.rgb.data(), image.width, image.height, options);
                } catch (const deedsr::Error &e) {
                    if (failed.fetch_add(1) == 0) first_error = e.what();
                }
            });
        }
        for (auto &thread : pool) thread.join();
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        if (failed) {
            std::cerr << "error: " << first_error << "\n";
            return 10 + DEEDSR_INTERNAL_ERROR;
        }
        for (int t = 0; t < threads; t++)
            write_ppm(std::string(argv[3]) + "-" + std::to_string(t) + ".ppm", results[t].data(), 4 * image.width,
                      4 * image.height);
        std::printf("%d threads, %d images in %.3f s: %.3f images/s\n", threads, threads * per_thread, seconds,
                    threads * per_thread / seconds);
    } catch (const deedsr::Error &e) {
        std::cerr << "error: " << e.what() << "\n";
        return 10 + e.code();
    } catch (const std::exception &e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
