"""Performance tooling: ahead-of-time sm_90 compilation of the ops' kernels, the static SASS performance model,
its public calibration anchors, the committed baseline and the CUDA C++ library's report. Sits above lavin_fast.ops
(it reads the specs the op modules register) and below the command line; nothing in the library needs it to run."""
