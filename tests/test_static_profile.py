"""The SASS reading of ``benchmarks/static.py`` (the static profile's instructions per score element) on
synthetic listings in cuobjdump's format; the profile itself runs in .ci/run (it compiles the kernels)."""
from benchmarks.static import loop_paths, main_loops, parse

# head 0x10: a diamond (conditional branch over 3 instructions), an MMA, the back-edge at 0x80; then EXIT
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R2, R3, RZ ;
        /*0020*/               @P0 BRA 0x60 ;
        /*0030*/                   LDG.E R4, desc[UR4][R6.64] ;
        /*0040*/                   LDG.E R5, desc[UR4][R8.64] ;
        /*0050*/                   FADD R4, R4, R5 ;
        /*0060*/                   HMMA.16816.F32 R12, R16, R20, R12 ;
        /*0070*/                   ISETP.GE.AND P1, PT, R2, R3, PT ;
        /*0080*/              @!P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
"""


def test_shortest_and_longest_path_through_the_loop():
    insts = parse(SASS)
    assert len(insts) == 10 and insts[2] == (0x20, "@P0 BRA 0x60")
    assert loop_paths(insts, 0x10, 0x80) == (5, 8)  # skipping the gathers: 0x10,20,60,70,80; through them: 8


def test_main_loop_found_with_its_mma_and_gathers():
    (lp,) = main_loops(parse(SASS))
    assert (lp["head"], lp["tail"], lp["mma"], lp["ldg"], lp["shortest"], lp["longest"]) == (0x10, 0x80, 1, 2, 5, 8)


def test_loops_without_mma_are_not_main_loops():
    assert main_loops(parse(SASS.replace("HMMA.16816.F32", "FFMA"))) == []


def test_out_of_line_jump_back_is_not_a_loop():
    """A slow path placed after the loop that jumps back into it (as nvcc lays out a warp-synchronous shuffle's
    retry) is a backward branch that closes no loop: no forward path leads from its target to it."""
    sass = SASS.replace("        /*0090*/                   EXIT ;", """        /*0090*/                   EXIT ;
        /*00a0*/                   SHFL.IDX PT, R4, R4, R5, 0x1f ;
        /*00b0*/                   BRA 0x60 ;""").replace("@P0 BRA 0x60", "@P0 BRA 0xa0")
    insts = parse(sass)
    assert loop_paths(insts, 0x60, 0xb0) is None
    (lp,) = main_loops(insts)
    assert (lp["head"], lp["tail"]) == (0x10, 0x80)


def test_sweep_configs_argument(monkeypatch, tmp_path):
    """``--configs`` takes 4 fields, or 5 (the forward's saturated width), and refuses other forms."""
    import pytest

    from benchmarks import static

    seen = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(static, "sweep", lambda progress, configs: seen.append(configs) or
                        {"date": "x", "kernels": []})
    monkeypatch.setattr(static, "table", lambda prof: "")
    assert static.main(["--sweep", "--configs", "fwd=64/64/4/2/128,bwd=32/32/4/1", "--out", str(tmp_path)]) == 0
    assert seen == [{"fwd": [(64, 64, 4, 2, 128)], "bwd": [(32, 32, 4, 1)]}]
    with pytest.raises(SystemExit):
        static.main(["--sweep", "--configs", "fwd=64/64/4", "--out", str(tmp_path)])


def test_cuda_profile_check_names_each_missed_target():
    """``python -m benchmarks.static_cuda --check`` (CI): a spilling kernel, one whose wgmmas ptxas serialized (C75xx,
    read from its log), and a saturated forward over issue 15's target at D = 32 / 64 (its shortest path, or its
    settled iteration's longest), are problems; D = 128's forward, the backward's saturated loops and a profile
    without the zone builds are not held to it.  The newest committed profile meets every target."""
    import glob
    import json
    import os

    from benchmarks import static_cuda as sc

    def row(kernel, D, spill=0, sat=None, settled=None):
        r = {"kernel": kernel, "arch": "sm_90a", "dtype": "fp16", "D": D, "spill_stores": spill, "spill_loads": spill}
        if sat is not None:
            r["zones"] = {"saturated": [{"per_element_shortest": sat, "per_element_longest": sat + 3}],
                          "saturated, settled": None if settled is None else
                          [{"per_element_shortest": sat, "per_element_longest": settled}]}
        return r

    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non "
           "wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline stage in "
           "the function '_Z1kv'\n"
           "ptxas info    : Used 237 registers, used 1 barriers\n")
    serialized = sc.parse_ptxas(log)["_Z1kv"]
    assert serialized["regs"] == 237 and serialized["wgmma_serialized"].startswith("C7514: non wgmma instructions read")
    prof = {"kernels": [row("dfa_fwd_kernel", 64, sat=9.9, settled=9.95),
                        row("dfa_fwd_kernel (wgmma)", 32, sat=10.2, settled=9.0),
                        row("dfa_fwd_kernel", 32, sat=8.5, settled=10.4), row("dfa_fwd_kernel (wgmma)", 64, sat=8.0),
                        row("dfa_fwd_kernel", 128, sat=14.7, settled=20.0), row("dfa_bwd_dq_kernel", 64, sat=13.9),
                        row("dfa_bwd_dkdv_kernel", 64, spill=8), row("dfa_fwd_kernel", 64),
                        {**row("dfa_fwd_kernel (wgmma serial)", 64), **serialized}]}
    bad = sc.problems(prof)
    assert len(bad) == 5, bad
    assert "dfa_fwd_kernel (wgmma) sm_90a fp16 D=32: saturated forward 10.2" in bad[0]
    assert "dfa_fwd_kernel sm_90a fp16 D=32: settled saturated iteration 10.4 instructions per element > 10.0" in bad[1]
    assert "dfa_fwd_kernel (wgmma) sm_90a fp16 D=64: no 'saturated, settled' build" in bad[2]
    assert "dfa_bwd_dkdv_kernel sm_90a fp16 D=64: spills 8/8 B" in bad[3]
    assert "dfa_fwd_kernel (wgmma serial) sm_90a fp16 D=64: ptxas serialized its wgmmas (C7514: non wgmma" in bad[4]
    # the helper kernels (no main loop): read from the log by name and template arguments, their spills a problem too
    log = ("ptxas info    : Compiling entry function '_ZN3dfa20dfa_sat_terms_kernelI6__halfLi64EEEvNS_6ParamsEbPT_' "
           "for 'sm_80'\n"
           "ptxas info    : Function properties for _ZN3dfa20dfa_sat_terms_kernelI6__halfLi64EEEvNS_6ParamsEbPT_\n"
           "    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 30 registers, used 1 barriers\n"
           "ptxas info    : Compiling entry function '_ZN3dfa24dfa_band_to_slots_kernelI13__nv_bfloat16Lb1EEEvNS_6ParamsE"
           "PKiS5_PT_l' for 'sm_80'\n"
           "ptxas info    : Used 32 registers, used 1 barriers\n")
    hs = sc.helpers(log, "80")
    assert [(h["kernel"], h["dtype"], h["args"], h["regs"]) for h in hs] == [
        ("dfa_sat_terms_kernel", "fp16", "D=64", 30), ("dfa_band_to_slots_kernel", "bf16", "by key", 32)]
    assert sc.problems({"kernels": [], "helpers": hs}) == ["dfa_sat_terms_kernel sm_80 fp16 D=64: spills 4/4 B"]
    assert "| dfa_sat_terms_kernel | sm_80 | fp16 | D=64 | 30 | 4/4 | 0 |" in sc.table(
        {"date": "d", "nvcc": "v", "kernels": [], "helpers": hs})
    results = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
    with open(sorted(glob.glob(os.path.join(results, "*-static", "cuda.json")))[-1]) as f:
        assert sc.problems(json.load(f)) == []
