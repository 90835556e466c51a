"""benchmarks/profile_step.py: the pure logic of the profile report, on synthetic profiler records (no GPU
needed), and one small CPU run of the script.

What is checked: GPU-side annotation ranges are not kernels and add no busy time; busy time is the union
of the kernel intervals and idle time the wall time minus it; family shares sum to 1 and a family's
ms/step is its summed duration / steps; real kernel names (inductor's triton kernels, cuBLAS / cuDNN,
flash attention, at::native) go to the right family; CUDA launch / sync API calls are counted per step
and per step kind; the host-bound verdict follows its documented rule."""

import math
import os
import re
import sys
import types

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import profile_step as ps  # noqa: E402


def _event(name, start, end, device=DeviceType.CUDA, annotation=False, activity=None, thread=1):
    """A real profiler FunctionEvent, as ``prof.events()`` returns them."""
    e = FunctionEvent(id=0, name=name, thread=thread, start_us=start, end_us=end, device_type=device)
    e.is_user_annotation = annotation
    e.activity_type = activity
    return e


# ----------------------------------------------------------------------------- device summary
def test_annotation_spanning_two_kernels_and_a_gap_is_not_busy_time():
    records = [("## Call CompiledFxGraph fabc ##", 0.0, 1000.0, True),  # spans both kernels and the gap
               ("triton_poi_fused_add_0", 0.0, 100.0, False),
               ("triton_per_fused_sum_1", 900.0, 1000.0, False)]
    s = ps.summarize_device(records, steps=1, wall_s=1e-3)
    assert s.kernels == 2 and s.annotations == 1 and s.copies == 0
    assert s.busy_ms == pytest.approx(0.2)  # the two kernels only, not the 0.8 ms gap
    assert s.kernel_ms == pytest.approx(0.2)
    assert s.idle_ms == pytest.approx(0.8)  # wall 1 ms - busy
    assert {f for f, _, _ in s.families} == {"fused (triton) pointwise", "fused (triton) reduction"}


def test_busy_time_is_the_union_of_kernel_intervals_and_kernel_time_their_sum():
    # two overlapping kernels (concurrent streams) and a third one; 2 steps in 100 us of wall time
    records = [("k1", 0.0, 10.0, False), ("k2", 5.0, 15.0, False), ("k3", 20.0, 25.0, False)]
    s = ps.summarize_device(records, steps=2, wall_s=100e-6)
    assert s.kernel_ms == pytest.approx((10 + 10 + 5) / 1e3 / 2)
    assert s.busy_ms == pytest.approx((15 + 5) / 1e3 / 2)
    assert s.idle_ms == pytest.approx((100 - 20) / 1e3 / 2)
    assert s.kernels == 1.5
    assert ps._union_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20


def test_family_shares_sum_to_one_and_ms_per_step_is_summed_duration_over_steps():
    records = [("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 0.0, 600.0, False),
               ("triton_poi_fused_silu_2", 600.0, 700.0, False),
               ("triton_poi_fused_silu_2", 700.0, 800.0, False),
               ("Memcpy HtoD (Pageable -> Device)", 800.0, 820.0, False),
               ("CompiledFunction", 0.0, 820.0, True)]
    steps = 4
    s = ps.summarize_device(records, steps=steps, wall_s=1e-3)
    shares = {f: share for f, share, _ in s.families}
    ms = {f: m for f, _, m in s.families}
    assert math.isclose(sum(shares.values()), 1.0)
    assert math.isclose(sum(ms.values()), s.kernel_ms)
    assert ms["gemm/conv"] == pytest.approx(600 / 1e3 / steps)
    assert ms["fused (triton) pointwise"] == pytest.approx(200 / 1e3 / steps)
    assert shares["memcpy/memset"] == pytest.approx(20 / 820)
    assert [f for f, _, _ in s.families][0] == "gemm/conv"  # largest first
    assert s.copies == pytest.approx(1 / steps) and s.kernels == pytest.approx(3 / steps)


def test_idle_by_step_kind_clips_device_intervals_to_each_step_span():
    spans = {3: (0.0, 100.0), 4: (100.0, 300.0)}  # step 4 logs
    records = [("k", 10.0, 60.0, False), ("k", 90.0, 120.0, False),  # the second one straddles the steps
               ("k", 250.0, 300.0, False), ("## annotation ##", 0.0, 300.0, True)]
    s = ps.summarize_device(records, steps=2, wall_s=300e-6, spans=spans, logging_steps=[4])
    assert s.by_kind["non-logging"] == pytest.approx((0.1, (100 - 50 - 10) / 1e3))
    assert s.by_kind["logging"] == pytest.approx((0.2, (200 - 20 - 50) / 1e3))


def test_device_records_from_real_function_events():
    events = [_event("aten::add", 0, 50, device=DeviceType.CPU, activity="cpu_op"),
              _event("## Call CompiledFxGraph fxyz ##", 0, 100, annotation=True, activity="gpu_user_annotation"),
              _event("triton_poi_fused_add_0", 10, 20, activity="kernel"),
              _event("Memcpy HtoD (Pageable -> Device)", 30, 40, activity="gpu_memcpy"),
              _event("Memset (Device)", 40, 41, activity="gpu_memset"),
              _event("Stream Sync", 50, 90, activity="cuda_sync")]
    records = ps.device_records(events)
    assert [r.name for r in records] == [e.name for e in events[1:]]  # the CPU op is not a device record
    assert [r.is_annotation for r in records] == [True, False, False, False, True]
    work = ps.kernel_events(records)
    assert [r.name for r in work] == ["triton_poi_fused_add_0", "Memcpy HtoD (Pageable -> Device)", "Memset (Device)"]
    s = ps.summarize_device(records, steps=1, wall_s=100e-6)
    assert s.kernels == 1 and s.copies == 2 and s.busy_ms == pytest.approx(0.021)


def test_device_records_without_the_annotation_attributes():
    """Older torch: no ``is_user_annotation`` / ``activity_type`` attribute; the records are work."""
    e = types.SimpleNamespace(name="void at::native::reduce_kernel<512, 1>()", device_type=DeviceType.CUDA,
                              time_range=types.SimpleNamespace(start=1.0, end=3.0))
    assert ps.device_records([e]) == [ps.DeviceRecord(e.name, 1.0, 3.0, False)]


# ----------------------------------------------------------------------------- families
@pytest.mark.parametrize("name,expected", [
    ("triton_poi_fused__native_batch_norm_legit_convolution_silu_3", "fused (triton) pointwise"),
    ("triton_poi_fused__to_copy_add_mul_1", "fused (triton) pointwise"),
    ("triton_red_fused_native_group_norm_backward_17", "fused (triton) reduction"),
    ("triton_per_fused_add_mul_sum_9", "fused (triton) reduction"),
    ("triton_per_fused_convolution_backward_native_group_norm_4", "fused (triton) reduction"),
    ("triton_tem_fused_convolution_0", "gemm/conv"),
])
def test_triton_kernels_go_to_triton_families(name, expected):
    assert ps.family(name) == expected


@pytest.mark.parametrize("name,expected", [
    # cuBLAS / cuDNN / CUTLASS on Hopper and Ampere
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "gemm/conv"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_"
     "execute_segment_k_off_kernel__5x_cudnn", "gemm/conv"),
    ("sm90_xmma_wgrad_implicit_gemm_indexed_wo_smem_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
     "gemm/conv"),
    ("cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32_bf16_bf16_128x128x64_1x1x1_0_tnn_align8_warpspecialized",
     "gemm/conv"),
    ("void cudnn::detail::dgrad_engine<float, 128, 6, 7, 3, 3, 5, false>(int, int, int, float const*, int)",
     "gemm/conv"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn", "gemm/conv"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>"
     "(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8::Params)", "gemm/conv"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>"
     "(cublasSplitKParams<float>, float const*)", "gemm/conv"),
    # cuDNN layout transposes (the name says cudnn, the work is a transpose)
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
     "(cudnnKernelDataType_t)0>(cudnn::ops::nchw2nhwc_params_t<float>, __nv_bfloat16 const*, __nv_bfloat16*)",
     "NCHW<->NHWC transpose"),
    ("void nhwcToNchwKernel<float, float, float, true, false, (cudnnKernelDataType_t)0>(int, int, int, int)",
     "NCHW<->NHWC transpose"),
    # attention (flash / memory-efficient / cuDNN), even though the names say cutlass / cudnn / fprop
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, "
     "false, true, true, false, false>(pytorch_flash::Flash_fwd_params)", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8>, "
     "true, false, false, false, false, false, false>(pytorch_flash::Flash_bwd_params)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<"
     "cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, true, 64, 64, 64, false>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    # at::native
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
     "CUDAFunctor_add<float> >(at::TensorIteratorBase&, at::native::CUDAFunctor_add<float> const&)::"
     "{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast<at::native::CUDAFunctor_add<float> >"
     "(at::TensorIteratorBase&, at::native::CUDAFunctor_add<float> const&)::{lambda(int)#1})", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
     "at::detail::Array<char*, 3> >(int, at::native::CUDAFunctor_add<float>, at::detail::Array<char*, 3>)",
     "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda("
     "at::TensorIteratorBase&)::{lambda()#2}::operator()() const::{lambda(float)#1}, at::detail::Array<char*, 2> >"
     "(int, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#2}, "
     "at::detail::Array<char*, 2>)", "dtype cast/copy"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda()#3}::operator()() const::{lambda(c10::BFloat16)#1}, at::detail::Array<char*, 2>, "
     "at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >(int)", "dtype cast/copy"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
     "(at::native::ADAM_MODE)0, false>, double*, double, double, double, double, double, bool, float*, float*>"
     "(at::native::(anonymous namespace)::FusedOptimizerTensorListMetadata<4>)", "optimizer/foreach"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<1>, at::native::(anonymous namespace)::lpnorm_cleanup<float, "
     "(at::native::(anonymous namespace)::NormType)1, float, float>>(int)", "optimizer/foreach"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
     "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
     "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, unsigned int, float, 4, 4>)", "reduction"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
     "float>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float, unsigned int, float, 4, 4>)", "reduction"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*, float*, "
     "float*)", "norm layers (group/layer/batch)"),
    ("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<float>(long, long, long, float const*, "
     "float const*, float const*, float const*, float*, float*)", "norm layers (group/layer/batch)"),
    ("void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, "
     "at::native::templates::cuda::normal_and_transform<float, float>(at::TensorIteratorBase&)>(long)",
     "RNG (rand/normal/dropout)"),
    ("void at::native::(anonymous namespace)::upsample_nearest2d_nhwc_out_frame<float>(float const*, float*)",
     "pool/upsample"),
    # CUPTI's copy and fill records
    ("Memcpy HtoD (Pageable -> Device)", "memcpy/memset"),
    ("Memcpy DtoH (Device -> Pinned)", "memcpy/memset"),
    ("Memset (Device)", "memcpy/memset"),
])
def test_cuda_kernel_names_go_to_their_family(name, expected):
    assert ps.family(name) == expected


@pytest.mark.parametrize("name,expected", [  # aten op names (the CPU table), without "aten::"
    ("convolution", "gemm/conv"), ("convolution_backward", "gemm/conv"), ("mkldnn_convolution", "gemm/conv"),
    ("addmm", "gemm/conv"), ("mm", "gemm/conv"), ("linear", "gemm/conv"), ("conv_transpose2d", "gemm/conv"),
    ("_scaled_dot_product_flash_attention", "attention"),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("native_group_norm", "norm layers (group/layer/batch)"),
    ("native_group_norm_backward", "norm layers (group/layer/batch)"),
    ("_to_copy", "dtype cast/copy"), ("copy_", "dtype cast/copy"), ("cat", "dtype cast/copy"),
    ("_fused_adam_", "optimizer/foreach"), ("_foreach_lerp_", "optimizer/foreach"),
    ("view", "view/alloc (host only)"), ("transpose", "view/alloc (host only)"),
    ("empty_strided", "view/alloc (host only)"),
    ("add", "elementwise"), ("addcmul_", "elementwise"), ("silu_backward", "elementwise"), ("mul_", "elementwise"),
    ("sum", "reduction"), ("linalg_vector_norm", "reduction"),
    ("normal_", "RNG (rand/normal/dropout)"), ("randn", "RNG (rand/normal/dropout)"),
    ("upsample_nearest2d", "pool/upsample"),
    ("_local_scalar_dense", "other"),
])
def test_aten_op_names_go_to_their_family(name, expected):
    assert ps.family(name) == expected


# ----------------------------------------------------------------------------- host side
@pytest.mark.parametrize("name,expected", [
    ("cudaLaunchKernel", "launch"), ("cudaLaunchKernel_v7000", "launch"), ("cudaLaunchKernelExC", "launch"),
    ("cudaLaunchKernelExC_v11060", "launch"), ("cuLaunchKernel", "launch"), ("cuLaunchKernelEx", "launch"),
    ("cudaGraphLaunch", "launch"), ("cudaGraphLaunch_v10000", "launch"),
    ("cudaStreamSynchronize", "sync"), ("cudaDeviceSynchronize", "sync"), ("cudaEventSynchronize", "sync"),
    ("cudaMemcpy", "sync"), ("cuStreamSynchronize", "sync"), ("cuMemcpyDtoH_v2", "sync"),
    ("cudaMemcpyAsync", None), ("cudaStreamWaitEvent", None), ("cudaEventRecord", None),
    ("cudaStreamIsCapturing", None), ("aten::add", None), ("cudaLaunchKernelFoo", None),
])
def test_host_api_kind(name, expected):
    assert ps.host_api_kind(name) == expected


def test_step_spans_run_from_one_marker_to_the_next():
    markers = [("profile_step#4", 100.0), ("profile_step#3", 0.0), ("profile_step#end", 250.0), ("aten::mm", 5.0)]
    assert ps.step_spans(markers) == {3: (0.0, 100.0), 4: (100.0, 250.0)}


def test_host_calls_per_step_and_per_step_kind():
    spans = {3: (0.0, 100.0), 4: (100.0, 200.0)}  # step 4 logs
    events = [_event("cudaLaunchKernel", 10, 14, device=DeviceType.CPU, activity="cuda_runtime"),
              _event("cuLaunchKernel", 11, 13, device=DeviceType.CPU, activity="cuda_driver"),  # inside the above
              _event("cuLaunchKernelEx", 20, 22, device=DeviceType.CPU, activity="cuda_driver"),
              _event("cudaLaunchKernel", 21, 23, device=DeviceType.CPU, thread=2),  # autograd thread: not nested
              _event("cudaLaunchKernel", 120, 124, device=DeviceType.CPU),
              _event("cudaMemcpyAsync", 130, 131, device=DeviceType.CPU),
              _event("cudaStreamSynchronize", 131, 171, device=DeviceType.CPU),
              _event("cudaLaunchKernel", 5, 6, device=DeviceType.CUDA),  # not a host record
              _event("aten::item", 129, 172, device=DeviceType.CPU)]
    calls = ps.host_calls(events)
    assert [c.name for c in calls] == ["cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernel",
                                       "cudaLaunchKernel", "cudaStreamSynchronize"]
    h = ps.summarize_host(calls, steps=2, spans=spans, logging_steps=[4])
    assert h.launch_calls == 2.0  # 4 outermost launches / 2 steps; the nested driver call counts once
    assert h.launch_ms == pytest.approx((4 + 2 + 2 + 4) / 1e3 / 2)
    assert h.sync_calls == 0.5 and h.sync_ms == pytest.approx(40 / 1e3 / 2)
    assert h.by_kind == {"non-logging": (0.0, 0.0), "logging": (1.0, pytest.approx(0.04))}
    assert h.launch_names == {"cudaLaunchKernel": 1.5, "cuLaunchKernelEx": 0.5}


def _summaries(idle_us, sync_calls):
    span = 1000.0
    records = [("k", 0.0, span - idle_us, False)]
    spans = {0: (0.0, span)}
    dev = ps.summarize_device(records, 1, span / 1e6, spans, logging_steps=[])
    calls = [ps.HostCall("cudaLaunchKernel", "launch", 0.0, 5.0)]
    calls += [ps.HostCall("cudaStreamSynchronize", "sync", 10.0 + i, 10.5 + i) for i in range(sync_calls)]
    return dev, ps.summarize_host(calls, 1, spans, logging_steps=[])


def test_verdict_rule():
    assert ps.verdict(*_summaries(idle_us=50, sync_calls=2)).startswith("device-bound: GPU idle 0.1 ms/step (5%")
    line = ps.verdict(*_summaries(idle_us=400, sync_calls=0))
    assert line.startswith("host-bound: GPU idle 0.4 ms/step (40% of the step) with no sync on non-logging steps")
    assert "1 launches" in line
    assert ps.verdict(*_summaries(idle_us=400, sync_calls=2)).startswith("host-bound with syncs: GPU idle 0.4 ms/step")


def test_report_profile_gpu_path_on_synthetic_events(capsys):
    """The GPU report from FunctionEvents as a CUDA profile has them (no GPU needed): 2 steps, the second
    one logs and syncs; an annotation range over everything must not count."""
    cpu = DeviceType.CPU
    events = [_event("profile_step#3", 0, 0, device=cpu, annotation=True, activity="user_annotation"),
              _event("profile_step#4", 1000, 1000, device=cpu, annotation=True, activity="user_annotation"),
              _event("profile_step#end", 2000, 2000, device=cpu, annotation=True, activity="user_annotation"),
              _event("cudaLaunchKernel", 10, 20, device=cpu, activity="cuda_runtime"),
              _event("cudaLaunchKernel", 1010, 1020, device=cpu, activity="cuda_runtime"),
              _event("cudaStreamSynchronize", 1100, 1500, device=cpu, activity="cuda_runtime"),
              _event("## Call CompiledFxGraph fabc ##", 0, 2000, annotation=True, activity="gpu_user_annotation"),
              _event("triton_poi_fused_add_0", 100, 300, activity="kernel"),
              _event("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 1100, 1700, activity="kernel")]
    prof = types.SimpleNamespace(events=lambda: events)
    args = types.SimpleNamespace(steps=2, warmup=3, log_every=5, device="cuda")  # step 4 logs
    ps.report_profile(prof, 1e-3, args)
    out = capsys.readouterr().out
    assert "wall time per step: 1.0 ms" in out
    assert "host span per step (step start to next step start): non-logging 1.0 ms, logging 1.0 ms" in out
    assert "GPU kernel time per step: 0.4 ms (summed durations, memcpy/memset included); GPU busy 0.4 ms " \
           "(union of the intervals) = 40.0%" in out
    assert "GPU idle per step: 0.6 ms (wall - busy); non-logging steps 0.8 ms (80%); logging steps 0.4 ms (40%)" in out
    assert "kernels per step: 1 (+ 0.0 memcpy/memset; 0.5 GPU annotation ranges per step not counted)" in out
    assert "host launch APIs per step: 1 calls, 0.0 ms CPU (cudaLaunchKernel 1.0)" in out
    assert "host sync APIs per step: 0.5 calls, 0.2 ms CPU; non-logging steps 0.0 calls 0.0 ms; " \
           "logging steps 1.0 calls 0.4 ms (cudaStreamSynchronize 0.5)" in out
    assert "host-bound: GPU idle 0.8 ms/step (80% of the step) with no sync on non-logging steps" in out
    assert re.search(r"gemm/conv +75\.0% +\( +0\.30 ms/step\)", out)
    assert re.search(r"fused \(triton\) pointwise +25\.0% +\( +0\.10 ms/step\)", out)


# ----------------------------------------------------------------------------- CPU smoke
def test_cpu_smoke(capsys):
    """The script end to end on CPU: the profile lines, then the aten-op / host-sync counts."""
    ps.main(["--config", "small", "--device", "cpu", "--steps", "2", "--warmup", "1", "--log-every", "2",
             "--batch-size", "2"])
    out = capsys.readouterr().out
    for line in ("wall time per step:", "host span per step (step start to next step start): ",
                 "host-bound verdict: not measured on CPU", "time shares by family (aten self CPU time, ",
                 "per step (global step: aten ops / host syncs):", "non-logging steps: ", "logging steps: ",
                 "host syncs on logging step 1:", "host syncs on non-logging step 2:"):
        assert line in out, (line, out)
    rows = re.findall(r"^  (\S.*?) +(\d+\.\d)%  \( *(\d+\.\d+) ms/step\)$", out, flags=re.M)
    assert {"gemm/conv", "elementwise"} <= {name for name, _, _ in rows}
    assert sum(float(share) for _, share, _ in rows) == pytest.approx(100.0, abs=0.1 * len(rows))
    total = float(re.search(r"aten self CPU time, ([0-9.]+) ms/step", out).group(1))
    assert sum(float(ms) for _, _, ms in rows) == pytest.approx(total, abs=0.01 * len(rows))
