/* Lets Intel MKL take its AVX-512 code paths on a non-Intel x86 CPU (benchmarking only).
 *
 * torch's CPU GEMMs are MKL's. On AMD CPUs MKL checks the vendor and runs its AVX2 kernels,
 * so on an AVX-512 AMD CPU torch reaches about half of the machine's matmul peak (measured on
 * a Zen 5 EPYC: 210-221 GFLOP/s against 513 with this shim). torch "at its best" on such a
 * machine is torch with this shim, and the same code path Intel AVX-512 servers get by
 * default. MKL asks these two functions whether the CPU is Intel's; answering yes selects
 * the code path by the instruction sets the CPU reports.
 *
 *   cc -shared -fPIC -o /tmp/libmkl_avx512.so benchmarks/mkl_avx512_shim.c
 *   LD_PRELOAD=/tmp/libmkl_avx512.so python benchmarks/bench_pretrain.py --steps 5
 *
 * The benchmark lines then carry LD_PRELOAD in their machine tag. Nothing in hipt_jax uses
 * MKL (XLA:CPU has its own GEMMs); this only changes the torch side of a comparison.
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_cpu_true(void) { return 1; }
