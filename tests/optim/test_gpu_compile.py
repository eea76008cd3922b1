"""The GPU kernels compile for real NVIDIA targets, checked without a GPU.

Triton's interpreter (``test_gpu_step.py``) runs the kernels' Python, not Triton's compiler, which
has its own rules (constexpr-only globals, one return type per function, layouts of ``tl.join`` and
``tl.dot``). This compiles every kernel, and the apply kernel in both numeric modes, for sm_90
(H100 / H200) and sm_80 (A100) through Triton's NVIDIA backend down to PTX and a cubin; no device
is needed. Skipped where the backend is not installed.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET"):
    pytest.skip("Triton's interpreter is on: the kernels are not compiled", allow_module_level=True)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

if "nvidia" not in triton.backends.backends:
    pytest.skip("Triton's NVIDIA backend is not installed", allow_module_level=True)

from lightning_lopt.optim.gpu import kernels as K  # noqa: E402

F32 = "*fp32"
TABLES = {"jobs_ptr": "*i64", "block_job_ptr": "*i32", "first_block_ptr": "*i64"}
KERNELS = {
    "reduce": (K.reduce_kernel, {**TABLES, "ws_ptr": F32}, {"BLOCK": 1024, "CELO": False, "G_BF16": True}),
    "reduce_matrix": (
        K.reduce_matrix_kernel,
        {"jobs_ptr": "*i64", "tile_job_ptr": "*i32", "first_tile_ptr": "*i64", "ws_ptr": F32},
        {"ROWS": 32, "COLS": 128, "CELO": True, "G_BF16": False},
    ),
    **{
        name: (K.tables_kernel, {"jobs_ptr": "*i64", "units_ptr": "*i64", "block_job_ptr": "*i32",
                                 "first_block_ptr": "*i64", "decays_ptr": F32, "ws_ptr": F32},
               {"BLOCK": 256, "COMMIT": commit})
        for name, commit in (("tables", True), ("tables-partial", False))  # partial: the sharded step's phase A
    },
    "row_factor": (K.row_factor_kernel, {"jobs_ptr": "*i64", "units_ptr": "*i64", "block_job_ptr": "*i32",
                                         "first_block_ptr": "*i64", "ws_ptr": F32}, {"BLOCK": 256}),
    "stats": (
        K.stats_kernel,
        {**TABLES, "decays_ptr": F32, "ws_ptr": F32, "stats_ptr": F32},
        {"BLOCK": 128, "ITERS": 8, "CELO": True, "STATE_BF16": True, "P_BF16": True, "G_BF16": True},
    ),
}
APPLY_ARGS = {
    **TABLES, "decays_ptr": F32, "ws_ptr": F32, "stats_ptr": F32, "scalars_ptr": F32, "w0_ptr": F32, "b0_ptr": F32,
    "w1_ptr": F32, "b1_ptr": F32, "w2_ptr": F32, "b2_ptr": F32, "lr_ptr": F32, "iteration_ptr": "*i64",
    "exp_mult": "fp32",
}
for precision, celo, bf16 in [("ieee", True, True), ("tf32", False, False)]:
    KERNELS[f"apply-{precision}-{'celo' if celo else 'small_fc'}-{'bf16' if bf16 else 'fp32'}"] = (
        K.apply_kernel,
        APPLY_ARGS,
        {"BLOCK": 128, "CELO": celo, "STATE_BF16": bf16, "P_BF16": bf16, "G_BF16": bf16, "PRECISION": precision},
    )


def _compile(fn, args, constexprs, capability):
    signature = {**args, **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


@pytest.mark.slow
@pytest.mark.parametrize("capability", [90, 80])
def test_every_kernel_compiles_for_nvidia_gpus(capability):
    for name, (fn, args, constexprs) in KERNELS.items():
        if capability == 80 and not name.startswith("apply"):
            continue  # the element and table kernels have no architecture-specific instructions
        compiled = _compile(fn, args, constexprs, capability)
        assert compiled.asm["ptx"] and compiled.asm["cubin"], name
