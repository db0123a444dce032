// The C API of train_alexnet.cu, for alexnet.py (cffi) and the tests: every operation with
// host arrays in and out, and a checkpoint's class probabilities for eval and predict.
// It includes the whole training program, so that one object holds both: make links the
// executables (train_alexnet, train_alexnet_cpu) and the shared libraries (libalexnet.so,
// libalexnet_cpu.so) from this file. train_alexnet.cu alone builds the training executable.
#include "train_alexnet.cu"

// ----------------------------------------------------------------------------
// 15. C API: every op with host arrays in and out, for alexnet.py and the tests.
// Each entry point returns 0 on success, or 1 with the reason in alexnet_last_error().

static thread_local std::string last_error;

extern "C" const char* alexnet_last_error(void) { return last_error.c_str(); }

template <typename Body>
static int api_call(Body&& body) {
    try {
        require_a_device("libalexnet_cpu.so, the CPU build (unset ALEXNET_LIB)");
        body();
        return 0;
    } catch (const std::exception& e) {
        last_error = e.what();
        return 1;
    }
}

// --- 15a. C API: convolution and fully connected
// Shapes are checked (conv_check_shape / fc_check_shape) before anything is allocated.

static long conv_input_size(const ConvShape& s) { return (long)s.N * s.C * s.H * s.W; }
static long conv_output_size(const ConvShape& s) { return (long)s.N * s.K * s.OH * s.OW; }
static long conv_weight_size(const ConvShape& s) { return (long)s.K * s.cg() * s.R * s.S; }

// The precision argument of the matrix products: 0 fp32, 1 tf32, 2 bf16 (Precision).
static Precision api_precision(int precision) {
    require(precision >= 0 && precision < NUM_PRECISIONS, "precision must be 0 (fp32), 1 (tf32) or 2 (bf16), got %d",
            precision);
    return (Precision)precision;
}

// The workspace of one call (none when the product is not split).
struct ApiWorkspace {
    DeviceArray<float> array;
    explicit ApiWorkspace(size_t floats) : array(floats) {}
    Workspace get() const { return Workspace{array.ptr, array.count}; }
};

// What the GEMM core's tiles need, for dev/sass.py's occupancy column.
extern "C" size_t alexnet_gemm_shared_bytes(int tile_m, int tile_n) {
    if (tile_m == 128 && tile_n == 128) return GemmTile<128, 128>::SHARED_BYTES;
    if (tile_m == 64 && tile_n == 128) return GemmTile<64, 128>::SHARED_BYTES;
    if (tile_m == 128 && tile_n == 64) return GemmTile<128, 64>::SHARED_BYTES;
    return 0;
}
// The tile and split that gemm_launch chooses on the current device in a precision, for
// the tests:
// op 0, 1, 2 = conv forward, backward data, backward weights (groups 1); 3, 4, 5 = fc
// forward, backward data, backward weights with C = in and K = out features (the other
// sizes ignored). out = {tile_m, tile_n, splits, tiles per split, blocks per wave}.
extern "C" int alexnet_gemm_plan(int op, int N, int C, int H, int W, int K, int R, int S,
                                 int stride, int pad, int OH, int OW, int precision, long* out) {
    return api_call([&] {
        require(op >= 0 && op < 6 && out, "gemm_plan: op must be 0..5");
        const Precision pr = api_precision(precision);
        GemmPlan plan;
        if (op < 3) {
            ConvShape s{N, C, H, W, K, R, S, stride, pad, 1, OH, OW};
            conv_check_shape(s);
            plan = op == 0 ? gemm_plan(ConvForward(s, nullptr, nullptr, nullptr, nullptr, false), -1, pr)
                   : op == 1 ? gemm_plan(ConvBackwardData(s, nullptr, nullptr, nullptr), -1, pr)
                             : gemm_plan(ConvBackwardWeights(s, nullptr, nullptr, nullptr), -1, pr);
        } else {
            fc_check_shape(N, C, K);
            plan = op == 3 ? gemm_plan(FcForward(N, C, K, nullptr, nullptr, nullptr, nullptr, false), -1, pr)
                   : op == 4 ? gemm_plan(FcBackwardData(N, C, K, nullptr, nullptr, nullptr), -1, pr)
                             : gemm_plan(FcBackwardWeights(N, C, K, nullptr, nullptr, nullptr), -1, pr);
        }
        long values[5] = {plan.tile_m, plan.tile_n, plan.dims.splits, plan.tiles, plan.slots};
        std::copy(values, values + 5, out);
    });
}

extern "C" int alexnet_gemm_threads(int tile_m, int tile_n) { return tile_m * tile_n / (GEMM_MICRO * GEMM_MICRO); }
extern "C" int alexnet_gemm_tile_k(void) { return GEMM_TILE_K; }

extern "C" int alexnet_conv_forward(float* out, const float* inp, const float* weight,
                                    const float* bias, int N, int C, int H, int W, int K, int R,
                                    int S, int stride, int pad, int groups, int OH, int OW,
                                    int relu, int precision) {
    return api_call([&] {
        ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
        conv_check_shape(s);
        require(out && inp && weight && bias, "conv_forward: null pointer argument");
        DeviceArray<float> d_out(conv_output_size(s)), d_inp(inp, conv_input_size(s)),
            d_weight(weight, conv_weight_size(s)), d_bias(bias, K);
        ApiWorkspace ws(conv_workspace(N, C, H, W, K, R, S, stride, pad, groups, OH, OW));
        conv_forward(d_out.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, C, H, W, K, R, S, stride,
                     pad, groups, OH, OW, relu != 0, ws.get(), api_precision(precision), 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_conv_backward_data(float* dinp, const float* dout, const float* weight,
                                          int N, int C, int H, int W, int K, int R, int S,
                                          int stride, int pad, int groups, int OH, int OW, int precision) {
    return api_call([&] {
        ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
        conv_check_shape(s);
        require(dinp && dout && weight, "conv_backward_data: null pointer argument");
        DeviceArray<float> d_dinp(conv_input_size(s)), d_dout(dout, conv_output_size(s)),
            d_weight(weight, conv_weight_size(s));
        ApiWorkspace ws(conv_workspace(N, C, H, W, K, R, S, stride, pad, groups, OH, OW));
        conv_backward_data(d_dinp.ptr, d_dout.ptr, d_weight.ptr, N, C, H, W, K, R, S, stride, pad,
                           groups, OH, OW, ws.get(), api_precision(precision), 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_conv_backward_weights(float* dweight, float* dbias, const float* dout,
                                             const float* inp, int N, int C, int H, int W, int K,
                                             int R, int S, int stride, int pad, int groups,
                                             int OH, int OW, int precision) {
    return api_call([&] {
        ConvShape s{N, C, H, W, K, R, S, stride, pad, groups, OH, OW};
        conv_check_shape(s);
        require(dweight && dbias && dout && inp, "conv_backward_weights: null pointer argument");
        DeviceArray<float> d_dweight(conv_weight_size(s)), d_dbias(K),
            d_dout(dout, conv_output_size(s)), d_inp(inp, conv_input_size(s));
        ApiWorkspace ws(conv_workspace(N, C, H, W, K, R, S, stride, pad, groups, OH, OW));
        conv_backward_weights(d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, N, C, H, W, K, R,
                              S, stride, pad, groups, OH, OW, ws.get(), api_precision(precision), 0);
        d_dweight.download(dweight);
        d_dbias.download(dbias);
    });
}

extern "C" int alexnet_fc_forward(float* out, const float* inp, const float* weight,
                                  const float* bias, int N, int in, int out_features, int relu, int precision) {
    return api_call([&] {
        fc_check_shape(N, in, out_features);
        require(out && inp && weight && bias, "fc_forward: null pointer argument");
        DeviceArray<float> d_out((long)N * out_features), d_inp(inp, (long)N * in),
            d_weight(weight, (long)out_features * in), d_bias(bias, out_features);
        ApiWorkspace ws(fc_workspace(N, in, out_features));
        fc_forward(d_out.ptr, d_inp.ptr, d_weight.ptr, d_bias.ptr, N, in, out_features,
                   relu != 0, ws.get(), api_precision(precision), 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_fc_backward_data(float* dinp, const float* dout, const float* weight,
                                        int N, int in, int out_features, int precision) {
    return api_call([&] {
        fc_check_shape(N, in, out_features);
        require(dinp && dout && weight, "fc_backward_data: null pointer argument");
        DeviceArray<float> d_dinp((long)N * in), d_dout(dout, (long)N * out_features),
            d_weight(weight, (long)out_features * in);
        ApiWorkspace ws(fc_workspace(N, in, out_features));
        fc_backward_data(d_dinp.ptr, d_dout.ptr, d_weight.ptr, N, in, out_features, ws.get(), api_precision(precision), 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_fc_backward_weights(float* dweight, float* dbias, const float* dout,
                                           const float* inp, int N, int in, int out_features, int precision) {
    return api_call([&] {
        fc_check_shape(N, in, out_features);
        require(dweight && dbias && dout && inp, "fc_backward_weights: null pointer argument");
        DeviceArray<float> d_dweight((long)out_features * in), d_dbias(out_features),
            d_dout(dout, (long)N * out_features), d_inp(inp, (long)N * in);
        ApiWorkspace ws(fc_workspace(N, in, out_features));
        fc_backward_weights(d_dweight.ptr, d_dbias.ptr, d_dout.ptr, d_inp.ptr, N, in,
                            out_features, ws.get(), api_precision(precision), 0);
        d_dweight.download(dweight);
        d_dbias.download(dbias);
    });
}

// --- 15b. C API: the other layers

// Every pointer argument must be non-NULL, except the outputs documented as optional.
static void require_pointers(const char* op, std::initializer_list<std::pair<const char*, const void*>> pointers) {
    for (const auto& p : pointers) require(p.second != nullptr, "%s: %s is NULL", op, p.first);
}

// The generator itself (host code path), for the known-answer tests.
extern "C" int alexnet_philox4x32(uint32_t* out, const uint32_t* counter, const uint32_t* key) {
    return api_call([&] {
        require_pointers("philox4x32", {{"out", out}, {"counter", counter}, {"key", key}});
        Philox4 r = philox4x32(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
        memcpy(out, r.word, sizeof(r.word));
    });
}

// The augmentation the loader draws for training batch `step` of `epoch` in a run of
// `preset` (n images of H x W, crops of `crop`), and the divisor of its crops: the same
// stream and function as Loader::fill, for the statistical tests.
extern "C" int alexnet_augmentation_draws(int* offsets, uint8_t* flips, float* alphas, float* divisor,
                                          const char* preset, uint64_t seed, long step, long epoch, int n, int H,
                                          int W, int crop) {
    return api_call([&] {
        require_pointers("augmentation_draws", {{"offsets", offsets}, {"flips", flips}, {"alphas", alphas},
                                                {"divisor", divisor}, {"preset", preset}});
        require(n >= 0 && step >= 0 && epoch >= 0 && crop >= 1 && crop <= H && crop <= W && H <= MAX_IMAGE_SIDE &&
                    W <= MAX_IMAGE_SIDE,
                "augmentation_draws: need n, step, epoch >= 0 and 1 <= crop <= H, W <= %d", (int)MAX_IMAGE_SIDE);
        HostRng rng(seed, RNG_AUGMENT, step);
        *divisor = draw_augmentation(rng, recipe_of(find_preset(preset)), epoch, n, H, W, crop, offsets, flips, alphas);
    });
}

// The ten test views of an H x W image (view_geometry): ys, xs, flips [10].
extern "C" int alexnet_view_geometry(int* ys, int* xs, uint8_t* flips, int H, int W, int crop) {
    return api_call([&] {
        require_pointers("view_geometry", {{"ys", ys}, {"xs", xs}, {"flips", flips}});
        require(crop >= 1 && crop <= H && crop <= W, "view_geometry: need 1 <= crop <= H, W");
        for (int v = 0; v < NUM_VIEWS; v++) view_geometry(v, H, W, crop, &ys[v], &xs[v], &flips[v]);
    });
}

extern "C" int alexnet_augment_images(float* out, const uint8_t* images, const float* mean,
                                      const int* offsets, const uint8_t* flips, const float* alphas,
                                      const float* eigval, const float* eigvec, int N, int H, int W, int crop,
                                      int centre_mean, float divisor) {
    return api_call([&] {
        require_pointers("augment_images", {{"out", out}, {"images", images}, {"mean", mean}, {"offsets", offsets},
                                            {"flips", flips}, {"alphas", alphas}, {"eigval", eigval}, {"eigvec", eigvec}});
        long count = augment_images_check(N, H, W, crop, divisor);
        for (int n = 0; n < N; n++) {
            int oy = offsets[2 * n], ox = offsets[2 * n + 1];
            require(oy >= 0 && oy <= H - crop && ox >= 0 && ox <= W - crop,
                    "augment_images: image %d: a %d crop at offset (%d, %d) leaves the %dx%d image", n, crop, oy, ox, H, W);
            require(flips[n] <= 1, "augment_images: image %d: flip must be 0 or 1 (got %d)", n, flips[n]);
        }
        long pixels = (long)H * W * 3;
        DeviceArray<uint8_t> d_images(images, N * pixels);
        DeviceArray<float> d_mean(mean, pixels), d_alphas(alphas, 3 * N), d_eigval(eigval, 3), d_eigvec(eigvec, 9);
        DeviceArray<int> d_offsets(offsets, 2 * N);
        DeviceArray<uint8_t> d_flips(flips, N);
        DeviceArray<float> d_out(count);
        augment_images(d_out.ptr, d_images.ptr, d_mean.ptr, d_offsets.ptr, d_flips.ptr, d_alphas.ptr,
                       d_eigval.ptr, d_eigvec.ptr, N, H, W, crop, centre_mean != 0, divisor, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_relu_forward(float* out, const float* inp, long n) {
    return api_call([&] {
        require_pointers("relu_forward", {{"out", out}, {"inp", inp}});
        elementwise_check("relu_forward", n);
        DeviceArray<float> d_inp(inp, n), d_out(n);
        relu_forward(d_out.ptr, d_inp.ptr, n, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_relu_backward(float* dinp, const float* dout, const float* out, long n) {
    return api_call([&] {
        require_pointers("relu_backward", {{"dinp", dinp}, {"dout", dout}, {"out", out}});
        elementwise_check("relu_backward", n);
        DeviceArray<float> d_dout(dout, n), d_out(out, n), d_dinp(n);
        relu_backward(d_dinp.ptr, d_dout.ptr, d_out.ptr, n, 0);
        d_dinp.download(dinp);
    });
}

// The two normalisations (across channels: lrn_*, within a map: spatial_norm_*) share
// their arguments: `check` validates the sizes, `forward` / `backward` is the launcher.
template <typename Check, typename Forward>
static int normalisation_forward(const char* op, Check check, Forward forward, float* out, float* scale,
                                 const float* inp, int N, int C, int H, int W, int size, float alpha, float beta,
                                 float k) {
    return api_call([&] {
        require_pointers(op, {{"out", out}, {"scale", scale}, {"inp", inp}});
        long count = check(N, C, H, W, size, alpha, beta, k);
        DeviceArray<float> d_inp(inp, count), d_out(count), d_scale(count);
        forward(d_out.ptr, d_scale.ptr, d_inp.ptr, N, C, H, W, size, alpha, beta, k, 0);
        d_out.download(out);
        d_scale.download(scale);
    });
}

template <typename Check, typename Backward>
static int normalisation_backward(const char* op, Check check, Backward backward, float* dinp, const float* dout,
                                  const float* inp, const float* out, const float* scale, int N, int C, int H, int W,
                                  int size, float alpha, float beta, float k) {
    return api_call([&] {
        require_pointers(op, {{"dinp", dinp}, {"dout", dout}, {"inp", inp}, {"out", out}, {"scale", scale}});
        long count = check(N, C, H, W, size, alpha, beta, k);
        DeviceArray<float> d_dout(dout, count), d_inp(inp, count), d_out(out, count), d_scale(scale, count), d_dinp(count);
        backward(d_dinp.ptr, d_dout.ptr, d_inp.ptr, d_out.ptr, d_scale.ptr, N, C, H, W, size, alpha, beta, k, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_lrn_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                                   int size, float alpha, float beta, float k) {
    return normalisation_forward("lrn_forward", lrn_check, lrn_forward, out, scale, inp, N, C, H, W, size, alpha,
                                 beta, k);
}

extern "C" int alexnet_lrn_backward(float* dinp, const float* dout, const float* inp, const float* out,
                                    const float* scale, int N, int C, int H, int W, int size, float alpha,
                                    float beta, float k) {
    return normalisation_backward("lrn_backward", lrn_check, lrn_backward, dinp, dout, inp, out, scale, N, C, H, W,
                                  size, alpha, beta, k);
}

extern "C" int alexnet_spatial_norm_forward(float* out, float* scale, const float* inp, int N, int C, int H, int W,
                                            int size, float alpha, float beta, float k) {
    return normalisation_forward("spatial_norm_forward", spatial_norm_check, spatial_norm_forward, out, scale, inp,
                                 N, C, H, W, size, alpha, beta, k);
}

extern "C" int alexnet_spatial_norm_backward(float* dinp, const float* dout, const float* inp, const float* out,
                                             const float* scale, int N, int C, int H, int W, int size, float alpha,
                                             float beta, float k) {
    return normalisation_backward("spatial_norm_backward", spatial_norm_check, spatial_norm_backward, dinp, dout,
                                  inp, out, scale, N, C, H, W, size, alpha, beta, k);
}

extern "C" int alexnet_maxpool_forward(float* out, const float* inp, int N, int C, int H, int W, int size,
                                       int stride, int OH, int OW) {
    return api_call([&] {
        require_pointers("maxpool_forward", {{"out", out}, {"inp", inp}});
        maxpool_check(N, C, H, W, size, stride, OH, OW);
        DeviceArray<float> d_inp(inp, (long)N * C * H * W), d_out((long)N * C * OH * OW);
        maxpool_forward(d_out.ptr, d_inp.ptr, N, C, H, W, size, stride, OH, OW, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_maxpool_backward(float* dinp, const float* dout, const float* inp, int N, int C, int H,
                                        int W, int size, int stride, int OH, int OW) {
    return api_call([&] {
        require_pointers("maxpool_backward", {{"dinp", dinp}, {"dout", dout}, {"inp", inp}});
        maxpool_check(N, C, H, W, size, stride, OH, OW);
        DeviceArray<float> d_dout(dout, (long)N * C * OH * OW), d_inp(inp, (long)N * C * H * W), d_dinp(d_inp.count);
        maxpool_backward(d_dinp.ptr, d_dout.ptr, d_inp.ptr, N, C, H, W, size, stride, OH, OW, 0);
        d_dinp.download(dinp);
    });
}

extern "C" int alexnet_dropout_forward(float* out, const float* inp, long n, float p, uint64_t seed,
                                       uint32_t layer, uint64_t step, int train) {
    return api_call([&] {
        require_pointers("dropout_forward", {{"out", out}, {"inp", inp}});
        dropout_check("dropout_forward", n, p);
        DeviceArray<float> d_inp(inp, n), d_out(n);
        dropout_forward(d_out.ptr, d_inp.ptr, n, p, seed, layer, step, train != 0, 0);
        d_out.download(out);
    });
}

extern "C" int alexnet_dropout_backward(float* dinp, const float* dout, long n, float p, uint64_t seed,
                                        uint32_t layer, uint64_t step) {
    return api_call([&] {
        require_pointers("dropout_backward", {{"dinp", dinp}, {"dout", dout}});
        dropout_check("dropout_backward", n, p);
        DeviceArray<float> d_dout(dout, n), d_dinp(n);
        dropout_backward(d_dinp.ptr, d_dout.ptr, n, p, seed, layer, step, 0);
        d_dinp.download(dinp);
    });
}

// dlogits and correct are optional (NULL: not computed).
extern "C" int alexnet_softmax_cross_entropy(float* losses, float* dlogits, int* correct, const float* logits,
                                             const int* labels, int N, int K) {
    return api_call([&] {
        require_pointers("softmax_cross_entropy", {{"losses", losses}, {"logits", logits}, {"labels", labels}});
        softmax_check(N, K);
        for (int n = 0; n < N; n++)
            require(labels[n] >= 0 && labels[n] < K, "softmax_cross_entropy: label %d of row %d is not in [0, %d)", labels[n], n, K);
        DeviceArray<float> d_logits(logits, (long)N * K), d_losses(N), d_dlogits(dlogits ? (long)N * K : 0);
        DeviceArray<int> d_labels(labels, N), d_correct(correct ? 2 : 0);
        softmax_cross_entropy(d_losses.ptr, dlogits ? d_dlogits.ptr : nullptr, correct ? d_correct.ptr : nullptr,
                              d_logits.ptr, d_labels.ptr, N, K, 0);
        d_losses.download(losses);
        if (dlogits) d_dlogits.download(dlogits);
        if (correct) d_correct.download(correct);
    });
}

extern "C" int alexnet_softmax_forward(float* probs, const float* logits, int N, int K) {
    return api_call([&] {
        require_pointers("softmax_forward", {{"probs", probs}, {"logits", logits}});
        softmax_check(N, K);
        DeviceArray<float> d_logits(logits, (long)N * K), d_probs(d_logits.count);
        softmax_forward(d_probs.ptr, d_logits.ptr, N, K, 0);
        d_probs.download(probs);
    });
}

// w and v are updated in place.
extern "C" int alexnet_sgd_update(float* w, float* v, const float* g, long n, float lr, float momentum,
                                  float weight_decay) {
    return api_call([&] {
        require_pointers("sgd_update", {{"w", w}, {"v", v}, {"g", g}});
        elementwise_check("sgd_update", n);
        DeviceArray<float> d_w(w, n), d_v(v, n), d_g(g, n);
        sgd_update(d_w.ptr, d_v.ptr, d_g.ptr, n, lr, momentum, weight_decay, 0);
        d_w.download(w);
        d_v.download(v);
    });
}

// --- 15c. C API: a checkpoint's class probabilities, for alexnet.py eval and predict
//
// A model opened once from a checkpoint (towers on devices 0 and 1, or both on 0 with one
// device), then asked for the softmax outputs of batches of stored-size images with their
// crops and mirrors: the Predictor of section 13b, the same path as --eval.

struct OpenModel {
    std::unique_ptr<Model> model;
    std::unique_ptr<Predictor> predictor;
    std::vector<int> labels;  // the forward pass computes a loss: any valid label will do
};

extern "C" int alexnet_model_open(void** handle, const char* checkpoint, int batch, int H, int W,
                                  const float* mean, int precision) {
    return api_call([&] {
        require_pointers("model_open", {{"handle", handle}, {"checkpoint", checkpoint}, {"mean", mean}});
        *handle = nullptr;
        require(batch >= 1 && H >= 1 && W >= 1, "model_open: need a positive batch and image size (batch=%d H=%d W=%d)",
                batch, H, W);
        Options o;
        TrainState state;
        Checkpoint c(checkpoint, o, state);
        if (precision >= 0) o.precision = api_precision(precision);  // else the checkpoint's
        int count = 0;
        cudaCheck(cudaGetDeviceCount(&count));
        require(count > 0, "model_open: no CUDA device");
        const int devices[NUM_TOWERS] = {0, count > 1 ? 1 : 0};
        std::unique_ptr<OpenModel> m(new OpenModel);
        m->model.reset(new Model(c.arch, batch, H, W, o.dropout, o.precision, devices));
        const float no_eigval[3] = {0, 0, 0}, identity[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
        m->model->set_statistics(mean, no_eigval, identity);
        m->model->upload_state(c.parameters(), c.momentum());
        m->predictor.reset(new Predictor(*m->model));
        m->labels.assign(batch, 0);
        *handle = m.release();
    });
}

extern "C" int alexnet_model_shape(void* handle, int* crop, int* classes) {
    return api_call([&] {
        require_pointers("model_shape", {{"handle", handle}, {"crop", crop}, {"classes", classes}});
        const Arch& a = ((OpenModel*)handle)->model->arch;
        *crop = a.crop, *classes = a.classes;
    });
}

// probs [n][classes] for images [n][H][W][3] cropped at offsets [n][2] = (y, x), mirrored
// where flips[i] is 1; n at most the batch given to alexnet_model_open.
extern "C" int alexnet_model_probabilities(void* handle, float* probs, const uint8_t* images,
                                           const int* offsets, const uint8_t* flips, int n) {
    return api_call([&] {
        require_pointers("model_probabilities", {{"handle", handle}, {"probs", probs}, {"images", images},
                                                 {"offsets", offsets}, {"flips", flips}});
        OpenModel& m = *(OpenModel*)handle;
        const Model& model = *m.model;
        require(n >= 1 && n <= model.capacity, "model_probabilities: %d images for a model opened with batch %d",
                n, model.capacity);
        const int crop = model.arch.crop;
        for (int i = 0; i < n; i++)
            require(offsets[2 * i] >= 0 && offsets[2 * i] <= model.image_h - crop && offsets[2 * i + 1] >= 0 &&
                        offsets[2 * i + 1] <= model.image_w - crop && flips[i] <= 1,
                    "model_probabilities: image %d: crop at (%d, %d) flip %d does not fit %dx%d crops of %dx%d images",
                    i, offsets[2 * i], offsets[2 * i + 1], flips[i], crop, crop, model.image_h, model.image_w);
        m.predictor->run(probs, images, m.labels.data(), offsets, flips, n);
    });
}

extern "C" void alexnet_model_close(void* handle) { delete (OpenModel*)handle; }
