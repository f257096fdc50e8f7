// The TensorFlow op around grouped_conv_kernels.h.

#include <algorithm>
#include <vector>

#include "grouped_conv_kernels.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/kernel_shape_util.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tensorflow {

REGISTER_OP("KerasResnextGroupedConv2D")
    .Input("input: float")
    .Input("filter: float")
    .Input("scale: float")
    .Input("offset: float")
    .Output("output: float")
    .Attr("stride: int")
    .Attr("explicit_paddings: list(int)")  // top, bottom, left, right
    .Attr("relu: bool = false")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle input, filter;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &filter));
      int stride;
      std::vector<int> pads;
      TF_RETURN_IF_ERROR(c->GetAttr("stride", &stride));
      TF_RETURN_IF_ERROR(c->GetAttr("explicit_paddings", &pads));
      if (pads.size() != 4 || *std::min_element(pads.begin(), pads.end()) < 0) {
        return errors::InvalidArgument("explicit_paddings needs 4 values >= 0");
      }
      // TensorFlow's own rule, so shapes and errors match Conv2D's.
      auto out_dim = [&](shape_inference::DimensionHandle in, int before, int after,
                         shape_inference::DimensionHandle* out) {
        return shape_inference::GetWindowedOutputSizeFromDimsV2(
            c, in, 3, 1, stride, Padding::EXPLICIT, before, after, out);
      };
      shape_inference::DimensionHandle ho, wo;
      TF_RETURN_IF_ERROR(out_dim(c->Dim(input, 1), pads[0], pads[1], &ho));
      TF_RETURN_IF_ERROR(out_dim(c->Dim(input, 2), pads[2], pads[3], &wo));
      c->set_output(0, c->MakeShape({c->Dim(input, 0), ho, wo, c->Dim(filter, 3)}));
      return OkStatus();
    });

class GroupedConv2DOp : public OpKernel {
 public:
  explicit GroupedConv2DOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("stride", &stride_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("explicit_paddings", &pads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
    OP_REQUIRES(ctx, stride_ == 1 || stride_ == 2,
                errors::InvalidArgument("stride must be 1 or 2, got ", stride_));
    OP_REQUIRES(ctx, pads_.size() == 4 && *std::min_element(pads_.begin(), pads_.end()) >= 0,
                errors::InvalidArgument("explicit_paddings needs 4 values >= 0"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& input = ctx->input(0);
    const Tensor& filter = ctx->input(1);
    const Tensor& scale = ctx->input(2);
    const Tensor& offset = ctx->input(3);
    OP_REQUIRES(ctx, input.dims() == 4 && filter.dims() == 4,
                errors::InvalidArgument("input and filter must be 4-D"));
    Conv s;
    s.n = input.dim_size(0);
    s.h = input.dim_size(1);
    s.w = input.dim_size(2);
    s.c = input.dim_size(3);
    s.cg = filter.dim_size(2);
    s.cout = filter.dim_size(3);
    OP_REQUIRES(ctx, filter.dim_size(0) == 3 && filter.dim_size(1) == 3,
                errors::InvalidArgument("filter must be 3x3"));
    OP_REQUIRES(ctx, s.cg > 0 && s.c % s.cg == 0,
                errors::InvalidArgument("input channels ", s.c,
                                        " are not a multiple of the filter's ", s.cg));
    s.groups = s.c / s.cg;
    OP_REQUIRES(ctx, s.cout == s.c,
                errors::InvalidArgument("needs as many output as input channels"));
    const RowFn row = select_row(s.cg, stride_);
    OP_REQUIRES(ctx, row != nullptr && s.cout % 8 == 0,
                errors::InvalidArgument("unsupported channels per group: ", s.cg));
    s.stride = stride_;
    s.pad_top = pads_[0];
    s.pad_bottom = pads_[1];
    s.pad_left = pads_[2];
    s.pad_right = pads_[3];
    // Inputs smaller than the kernel give TensorFlow's empty output or error.
    int64_t ho, wo, top = s.pad_top, bottom = s.pad_bottom, left = s.pad_left,
                    right = s.pad_right;
    OP_REQUIRES_OK(ctx, GetWindowedOutputSizeVerbose(s.h, 3, 1, stride_, Padding::EXPLICIT,
                                                     &ho, &top, &bottom));
    OP_REQUIRES_OK(ctx, GetWindowedOutputSizeVerbose(s.w, 3, 1, stride_, Padding::EXPLICIT,
                                                     &wo, &left, &right));
    s.ho = static_cast<int>(ho);
    s.wo = static_cast<int>(wo);
    s.relu = relu_;
    s.scale = nullptr;
    s.offset = nullptr;
    if (scale.NumElements() > 0) {
      OP_REQUIRES(ctx, scale.NumElements() == s.cout && offset.NumElements() == s.cout,
                  errors::InvalidArgument("scale and offset need one value per channel"));
      s.scale = scale.flat<float>().data();
      s.offset = offset.flat<float>().data();
    }

    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({s.n, s.ho, s.wo, s.cout}), &output));
    if (output->NumElements() == 0) return;

    Tensor packed;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_FLOAT, filter.shape(), &packed));
    pack_weights(s, filter.flat<float>().data(), packed.flat<float>().data());

    const float* x = input.flat<float>().data();
    const float* wp = packed.flat<float>().data();
    float* y = output->flat<float>().data();
    const int64_t rows = static_cast<int64_t>(s.n) * s.ho;
    const int64_t cost = static_cast<int64_t>(s.wo) * s.cout * 9 * s.cg;
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    Shard(workers->NumThreads(), workers, rows, cost, [&](int64_t begin, int64_t end) {
      thread_local RowRing ring;
      ring.prepare(s);
      for (int64_t r = begin; r < end; ++r) row(s, ring, x, wp, y, r / s.ho, r % s.ho);
    });
  }

 private:
  int stride_;
  std::vector<int> pads_;
  bool relu_;
};

REGISTER_KERNEL_BUILDER(Name("KerasResnextGroupedConv2D").Device(DEVICE_CPU), GroupedConv2DOp);

}  // namespace tensorflow
