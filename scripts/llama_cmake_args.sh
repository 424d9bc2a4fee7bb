#!/usr/bin/env bash
# Print the CMAKE_ARGS that build llama-cpp-python for this machine's CPU.
#
# x86-64 Linux: a portable build (GGML_NATIVE=OFF) with exactly the SIMD extensions
# /proc/cpuinfo reports. The native build can pick code paths the machine cannot run (it
# segfaults in ggml_backend_amx_mul_mat on some AMX CPUs), and extensions a VM hides
# (AVX-512 on some hosts) die with SIGILL. Elsewhere (ARM, macOS) print nothing: the
# default native build is right there.
set -euo pipefail
[ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ] || exit 0
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
args="-DGGML_NATIVE=OFF"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
            avx512_vnni:AVX512_VNNI avx512vbmi:AVX512_VBMI avx512_bf16:AVX512_BF16 \
            avx_vnni:AVX_VNNI; do
  cpu=${pair%%:*}
  ggml=${pair##*:}
  if [[ $flags == *" $cpu "* ]]; then
    args="$args -DGGML_$ggml=ON"
  else
    args="$args -DGGML_$ggml=OFF"
  fi
done
echo "$args"
