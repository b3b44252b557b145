"""benchmarks/ncu_steps.py's parsing and its behaviour without ncu (the profile itself needs a GPU and ncu)."""

from __future__ import annotations

import os
import time

from benchmarks import ncu_steps

# The shape of `ncu --csv --page details`: the program's and ncu's own lines first, then one row a metric.
HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _row(kid, kernel, section, metric, unit, value, grid="(6144, 1, 1)"):
    return (f'"{kid}","77","python","host","{kernel}","1","7","(256, 1, 1)","{grid}","0","9.0","{section}",'
            f'"{metric}","{unit}","{value}"')


KERNEL_A = "void convmixer_kernels::dwcuda::dw_fwd_tiled_kernel<__nv_bfloat16, 7, true>(convmixer_kernels::A)"
KERNEL_B = "sum_finalize_kernel(const float *, int)"
CSV = "\n".join([
    "==PROF== Connected to process 77",
    "some line the program printed",
    HEAD,
    _row(0, KERNEL_A, "GPU Speed Of Light Throughput", "Duration", "usecond", "354.21"),
    _row(0, KERNEL_A, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "61.5"),
    _row(0, KERNEL_A, "GPU Speed Of Light Throughput", "Memory Throughput", "%", "23.0"),
    _row(0, KERNEL_A, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "14.2"),
    _row(0, KERNEL_A, "Occupancy", "Achieved Occupancy", "%", "23.9"),
    _row(0, KERNEL_A, "Launch Statistics", "Registers Per Thread", "register/thread", "128"),
    _row(0, KERNEL_A, "Warp State Statistics", "Warp Cycles Per Issued Instruction", "cycle", "7.1"),
    _row(0, KERNEL_A, "Command line profiler metrics",
         "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "ratio", "3.2"),
    _row(0, KERNEL_A, "Command line profiler metrics",
         "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "ratio", "1.5"),
    _row(0, KERNEL_A, "Command line profiler metrics",
         "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio", "ratio", "9.0"),
    _row(0, KERNEL_A, "Command line profiler metrics",
         "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio", "ratio", "0.4"),
    _row(0, KERNEL_A, "Command line profiler metrics",
         "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "ratio", "0.9"),
    _row(1, KERNEL_B, "GPU Speed Of Light Throughput", "Duration", "nsecond", "4,096", grid="(3, 1, 1)"),
    _row(1, KERNEL_B, "Scheduler Statistics", "No Eligible", "%", "91.2", grid="(3, 1, 1)"),
    "==PROF== Disconnected from process 77",
])


def test_kernels_of_reads_every_launch_in_order_with_units():
    ks = ncu_steps.kernels_of(ncu_steps.rows_of(CSV))
    assert [k["name"] for k in ks] == ["convmixer_kernels::dwcuda::dw_fwd_tiled_kernel<__nv_bfloat16, 7, true>",
                                       "sum_finalize_kernel"]
    a, b = ks
    assert a["us"] == 354.21 and a["SM %"] == 61.5 and a["DRAM %"] == 14.2 and a["regs"] == 128
    assert a["cyc/issue"] == 7.1 and "no elig %" not in a  # (a metric ncu did not print)
    assert abs(b["us"] - 4.096) < 1e-9  # nanoseconds, with a thousands separator
    assert b["no elig %"] == 91.2 and b["grid"] == "(3, 1, 1)"
    # the largest stall reasons, 'selected' (issuing, not a stall) left out
    assert ncu_steps.top_stalls(a) == "long_scoreboard 3.2, barrier 1.5, wait 0.9"
    assert ncu_steps.top_stalls(b) == "-"
    table = ncu_steps.table("dw7_cl_eval", ks)
    assert "2 kernels, 358.3 us in all" in table
    assert table.count("\n| ") == 3  # the header and one line a kernel


def test_short_name_drops_long_template_arguments():
    long = "ns::kernel<" + ", ".join(f"cute::tuple<int, C<{i}>>" for i in range(8)) + ">(Params)"
    assert ncu_steps.short_name("void " + long) == "ns::kernel"
    assert ncu_steps.short_name("k<float, 3>(int)") == "k<float, 3>"
    # template arguments that hold parentheses (CUTLASS's enum casts): cut at the argument list only
    assert ncu_steps.short_name("void f<(cutlass::FloatRoundStyle)2, 4>(Params)") == "f<(cutlass::FloatRoundStyle)2, 4>"


def test_summary_without_rows_shows_ncus_error(tmp_path):
    p = tmp_path / "pw_cl_train.csv"
    p.write_text("==PROF== Connected\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission\n")
    s = ncu_steps.summarize([str(p)])
    assert "pw_cl_train: no kernels profiled" in s and "ERR_NVGPUCTRPERM" in s


def test_no_ncu_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NCU", str(tmp_path / "missing-ncu"))
    assert ncu_steps.main(["--out", str(tmp_path), "--cases", "dw7_cl_eval"]) == 0
    assert "no ncu" in open(os.path.join(tmp_path, "ncu", "summary.md")).read()
    assert "no ncu" in capsys.readouterr().out


def test_every_case_runs_its_step_on_the_cpu():
    """The child's module, inputs and step for every case (small, CPU backend): what ncu would profile."""
    for case in ncu_steps.CASES:
        ncu_steps.child(case, device="cpu", size=(2, 16, 8))


def _fake_ncu(tmp_path):
    """An executable that prints CSV (as ncu would for any program) and ignores its arguments."""
    data = tmp_path / "out.csv"
    data.write_text(CSV + "\n")
    exe = tmp_path / "fake-ncu"
    exe.write_text(f"#!/bin/sh\ncat '{data}'\n")
    exe.chmod(0o755)
    return str(exe)


def test_parent_writes_each_case_and_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("NCU", _fake_ncu(tmp_path))
    assert ncu_steps.main(["--out", str(tmp_path), "--cases", "pw_cl_train,dw7_cl_eval"]) == 0
    summary = open(os.path.join(tmp_path, "ncu", "summary.md")).read()
    assert summary.count("2 kernels, 358.3 us in all") == 2
    assert "### pw_cl_train" in summary and "### dw7_cl_eval" in summary
    assert os.path.exists(os.path.join(tmp_path, "ncu", "pw_cl_train.csv"))


def test_a_rejected_stall_metric_runs_the_case_again_without(tmp_path, monkeypatch):
    data = tmp_path / "out.csv"
    data.write_text(CSV + "\n")
    exe = tmp_path / "picky-ncu"
    exe.write_text("#!/bin/sh\ncase \"$*\" in *--metrics*) echo '==ERROR== Failed to find metric regex:x'; "
                   f"exit 1;; esac\ncat '{data}'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("NCU", str(exe))
    assert ncu_steps.main(["--out", str(tmp_path), "--cases", "dw7_cl_eval"]) == 0
    text = open(os.path.join(tmp_path, "ncu", "dw7_cl_eval.csv")).read()
    assert "Failed to find metric" in text and "(again without the stall metrics)" in text
    assert "2 kernels, 358.3 us in all" in open(os.path.join(tmp_path, "ncu", "summary.md")).read()


def test_a_case_past_its_time_stops_ncu_and_the_program(tmp_path, monkeypatch):
    """The profiled program is ncu's child: a timeout must stop both, or it would run on into the next case."""
    pidfile = tmp_path / "child.pid"
    exe = tmp_path / "slow-ncu"
    exe.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > '{pidfile}'\nwait\n")
    exe.chmod(0o755)
    t0 = time.monotonic()
    text = ncu_steps.run_ncu(str(exe), "dw7_cl_eval", timeout=1, stalls=False)
    assert "stopped after 1 s" in text
    assert time.monotonic() - t0 < 20, "the program outlived ncu (and held its output open)"
    pid = int(pidfile.read_text())
    for _ in range(50):  # (reaped by init shortly after the kill)
        if not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def test_budget_skips_cases_that_cannot_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NCU", _fake_ncu(tmp_path))
    assert ncu_steps.main(["--out", str(tmp_path), "--cases", "pw_cl_train", "--budget", "10"]) == 0
    assert "pw_cl_train: skipped" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(tmp_path, "ncu", "pw_cl_train.csv"))
