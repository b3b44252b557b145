"""benchmarks/sass_loops.py's parsers (the tool itself needs nvcc and cuobjdump; these need neither)."""

from __future__ import annotations

from benchmarks.sass_loops import loops, ptxas_info

# The shape cuobjdump -sass prints (addresses in comments, one instruction a line, encodings after it).
SASS = """
	code for sm_90a
		Function : _Z4kernPf
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   MOV R2, RZ ;                           /* 0x000fe20000000800 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0 */
        /*0030*/                   FFMA R6, R4, R5, R6 ;                  /* 0x0 */
        /*0040*/                   FFMA R7, R4, R5, R7 ;                  /* 0x0 */
        /*0050*/               @P0 STG.E desc[UR4][R2.64], R6 ;          /* 0x0 */
        /*0060*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;    /* 0x0 */
        /*0070*/              @!P0 BRA 0x20 ;                             /* 0x0 */
        /*0080*/                   EXIT ;                                 /* 0x0 */
		Function : _Z5otherv
        /*0000*/                   EXIT ;                                 /* 0x0 */
"""

PTXAS = """ptxas info    : Compiling entry function '_Z4kernPf' for 'sm_90a'
ptxas info    : Function properties for _Z4kernPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_loops_finds_the_backward_branch_and_counts_its_body():
    found = list(loops(SASS, "kern"))
    assert [name for name, _, _ in found] == ["_Z4kernPf"]
    _, total, body = found[0]
    assert total == 9
    assert len(body) == 1
    n, ops = body[0]
    assert n == 6  # 0x20 .. 0x70 inclusive
    assert (ops["LDG"], ops["FFMA"], ops["STG"], ops["ISETP"], ops["BRA"]) == (1, 2, 1, 1, 1)  # predicates stripped


def test_loops_filters_by_name_and_ignores_forward_branches():
    assert [name for name, _, _ in loops(SASS, "other")] == ["_Z5otherv"]
    assert list(loops(SASS, "other"))[0][2] == []


def test_ptxas_info_reads_registers_and_spills():
    assert ptxas_info(PTXAS) == {"_Z4kernPf": "40 regs, spills 4/12 B"}
