#!/usr/bin/env bash
# This machine's f32 peak: every core runs independent chains of AVX-512 fused multiply-adds
# (12 accumulators, enough to cover the FMA latency), no memory traffic. Prints GFLOP/s for 1
# thread and for all cores: the ceiling any f32 kernel here (bccp's or PyTorch's) can reach.
#
# Usage: scripts/fma-peak.sh   (needs gcc and a CPU with AVX-512F)
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/peak.c" <<'C'
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define CHAINS 12
#define STEPS 16000000L
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void *chains(void *out) {
  __m512 acc[CHAINS], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < STEPS; k++)
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  float sum = 0;
  for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_ps(acc[i]);
  *(float *)out = sum; /* kept, so the loop is not optimised away */
  return NULL;
}
int main(int argc, char **argv) {
  int threads = atoi(argv[1]);
  pthread_t t[256]; float out[256];
  double start = now();
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, chains, &out[i]);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  double flops = 2.0 * 16 * CHAINS * STEPS * threads;
  printf("%d thread(s): %.1f GFLOP/s f32\n", threads, flops / (now() - start) / 1e9);
  return out[0] == 0.12345f;
}
C
gcc -O3 -mavx512f -pthread -o "$work/peak" "$work/peak.c"
"$work/peak" 1
"$work/peak" "$(nproc)"
