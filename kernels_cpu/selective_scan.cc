// Mamba's selective scan for the CPU as XLA FFI custom calls, forward and backward.
// selective_scan.h says what they compute, the layouts, and why this exists; here are the shape
// checks and the handlers.

#include <cstdint>

#include "selective_scan.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// From u [B, T, E] and b [B, T, G, N].
ScanShape ScanShapeOf(ffi::Buffer<ffi::F32>& u, ffi::Buffer<ffi::F32>& b, int64_t block) {
  auto ud = u.dimensions(), bd = b.dimensions();
  return ScanShape{ud[0], ud[1], ud[2], bd[3], bd[2], block};
}

ffi::Error CheckScanShape(const ScanShape& sh) {
  if (sh.block <= 0 || sh.block % kLanes != 0)
    return ffi::Error::InvalidArgument("block must be a positive multiple of the vector lanes");
  if (sh.G <= 0 || sh.E % sh.G != 0 || (sh.E / sh.G) % sh.block != 0)
    return ffi::Error::InvalidArgument("block must divide the channels per group");
  return ffi::Error::Success();
}

ScanInputs InputsOf(ffi::Buffer<ffi::F32>& u, ffi::Buffer<ffi::F32>& dt,
                    ffi::Buffer<ffi::F32>& a_t, ffi::Buffer<ffi::F32>& b,
                    ffi::Buffer<ffi::F32>& c, ffi::Buffer<ffi::F32>& keep,
                    ffi::Buffer<ffi::F32>& h0) {
  return ScanInputs{u.typed_data(), dt.typed_data(), a_t.typed_data(), b.typed_data(),
                    c.typed_data(), keep.typed_data(), h0.typed_data()};
}

ffi::Error ScanForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dt,
                       ffi::Buffer<ffi::F32> a_t, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> keep,
                       ffi::Buffer<ffi::F32> h0, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> final_state, int64_t block) {
  const ScanShape sh = ScanShapeOf(u, b, block);
  if (auto error = CheckScanShape(sh); error.failure()) return error;
  ScanForwardAll(pool, sh, InputsOf(u, dt, a_t, b, c, keep, h0), y->typed_data(),
                 final_state->typed_data());
  return ffi::Error::Success();
}

ffi::Error ScanBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dt,
                        ffi::Buffer<ffi::F32> a_t, ffi::Buffer<ffi::F32> b,
                        ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> keep,
                        ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> dfinal, ffi::ResultBuffer<ffi::F32> du,
                        ffi::ResultBuffer<ffi::F32> ddt, ffi::ResultBuffer<ffi::F32> da,
                        ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dc,
                        ffi::ResultBuffer<ffi::F32> dh0, int64_t block) {
  const ScanShape sh = ScanShapeOf(u, b, block);
  if (auto error = CheckScanShape(sh); error.failure()) return error;
  ScanBackwardAll(pool, sh, InputsOf(u, dt, a_t, b, c, keep, h0), dy.typed_data(),
                  dfinal.typed_data(),
                  ScanGrads{du->typed_data(), ddt->typed_data(), da->typed_data(),
                            db->typed_data(), dc->typed_data(), dh0->typed_data()});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongjaxSelectiveScanForward, ScanForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u [B, T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dt [B, T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A transposed [N, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B [B, T, G, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C [B, T, G, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep [B, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, E, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [B, T, E]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final state [B, E, N]
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongjaxSelectiveScanBackward, ScanBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dt
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A transposed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // C
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keep
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy [B, T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d final state [B, E, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // du [B, T, E]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ddt [B, T, E]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dA transposed per row [B, N, E]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dB per block [B, T, E/block, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dC per block [B, T, E/block, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dh0 [B, E, N]
                                  .Attr<int64_t>("block"));
