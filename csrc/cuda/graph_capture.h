// Host-side helper of the CUDA entry points.
#pragma once

#include <c10/cuda/CUDAGraphsC10Utils.h>

namespace mtp_ext {

// Value checks and status reads synchronise with the device, which a CUDA graph capture forbids:
// the entry points skip them while the current stream is being captured.
inline bool capturing_graph() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

}  // namespace mtp_ext
