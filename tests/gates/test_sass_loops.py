"""gates.sass_loops on a hand-written SASS listing (no compiler needed).

The listing has an outer loop (0x0040 .. 0x0100) around an inner loop
(0x0060 .. 0x00c0, predicated branch), a second innermost loop behind them
(0x0130 .. 0x0150, uniform-predicate branch) and a forward branch, which is no
loop. NOPs are padding and are not counted.
"""
import pytest

from gates import sass_loops

LISTING = """
        Function : _some_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0030*/               @P0 BRA 0x170 ;
        /*0040*/                   MOV R2, RZ ;
        /*0050*/                   NOP ;
        /*0060*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0070*/                   LDS R10, [R4+UR5] ;
        /*0080*/                   FFMA R2, R10, R5, R2 ;
        /*0090*/                   IADD3 R8, P1, R8, 0x10, RZ ;
        /*00a0*/                   ISETP.NE.AND P2, PT, R8, R9, PT ;
        /*00b0*/                   NOP ;
        /*00c0*/               @P2 BRA 0x60 ;
        /*00d0*/                   FADD R3, R3, R2 ;
        /*00e0*/                   ISETP.NE.AND P3, PT, R3, RZ, PT ;
        /*00f0*/                   NOP ;
        /*0100*/              @!P3 BRA 0x40 ;
        /*0110*/                   SHFL.BFLY PT, R3, R3, 0x1, 0x1f ;
        /*0120*/                   STG.E desc[UR4][R6.64], R3 ;
        /*0130*/                   IMAD R7, R7, 0x2, RZ ;
        /*0140*/                   ISETP.NE.AND UP0, UPT, UR6, 0x3, UPT ;
        /*0150*/                   BRA.U UP0, 0x130 ;
        /*0160*/                   EXIT ;
        /*0170*/                   BRA 0x170;
"""


def test_every_backward_branch_is_a_loop():
    found = [(loop.start, loop.end) for loop in sass_loops.loops(LISTING)]
    # the final "BRA 0x170" at 0x170 branches to itself (the trap loop after EXIT): a one-instruction loop
    assert found == [(0x60, 0xC0), (0x40, 0x100), (0x130, 0x150), (0x170, 0x170)]


def test_innermost_loops_and_their_bodies():
    inner = sass_loops.innermost_loops(LISTING)
    assert [(loop.start, loop.end) for loop in inner] == [(0x60, 0xC0), (0x130, 0x150), (0x170, 0x170)]
    first = inner[0]
    assert first.instructions == 6  # LDG, LDS, FFMA, IADD3, ISETP, BRA (the NOP is padding)
    assert first.opcodes() == {"LDG": 1, "LDS": 1, "FFMA": 1, "IADD3": 1, "ISETP": 1, "BRA": 1}
    assert first.body[0].startswith("LDG.E.128")


def test_main_loop_is_the_largest_innermost_loop():
    loop = sass_loops.main_loop(LISTING)
    assert (loop.start, loop.end) == (0x60, 0xC0)
    assert sass_loops.instructions_per_item(LISTING, 4) == pytest.approx(1.5)


def test_no_loop_and_bad_counts():
    straight = "/*0000*/ MOV R1, RZ ;\n/*0010*/ EXIT ;\n"
    assert sass_loops.loops(straight) == []
    assert sass_loops.main_loop(straight) is None
    with pytest.raises(ValueError, match="no loop"):
        sass_loops.instructions_per_item(straight, 1)
    with pytest.raises(ValueError, match="items_per_trip"):
        sass_loops.instructions_per_item(LISTING, 0)
