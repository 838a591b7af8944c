"""The guide's checklist (section 7) as the live server reports it: metrics, slots, context,
batch sizes, mmap."""

from __future__ import annotations

from typing import Any

from tests.compliance.live import Server


def test_metrics_on_and_answering_with_the_key(server: Server) -> None:
    """--metrics is on and /metrics answers 200 with the key.

    Checklist (guide section 7): "`--metrics` on". The running process has --metrics and
    /metrics serves llama.cpp's llamacpp:* metrics (without --metrics it answers 501).
    """
    assert server.cfg.profile.metrics, "the inventory turns --metrics off (llama_metrics)"
    assert "--metrics" in server.cmdline, "the running llama-server has no --metrics"
    r = server.get("/metrics")
    assert r.status == 200, f"/metrics with the key answered {r.status}: {r.body[:200]}"
    assert "llamacpp:" in r.body, f"/metrics served no llamacpp: metric: {r.body[:200]}"


def test_slots_and_context_read_back_from_the_live_server(server: Server) -> None:
    """Slots and per-slot context, read back from the live server, are the profile's.

    Checklist: "tune --parallel, -c". /props total_slots and the number of /slots equal
    --parallel; each slot's n_ctx is -c split over the slots (all of -c with
    llama_kv_unified).
    """
    p = server.cfg.profile
    props = server.get("/props")
    assert props.status == 200, f"/props answered {props.status}"
    slots = server.get("/slots")
    assert slots.status == 200, f"/slots answered {slots.status}"
    listed = slots.json()
    assert props.json()["total_slots"] == p.parallel, (
        f"/props total_slots {props.json()['total_slots']}, profile --parallel {p.parallel}"
    )
    assert len(listed) == p.parallel, f"/slots lists {len(listed)}, profile {p.parallel}"
    per_slot = p.context if p.kv_unified else p.context // p.parallel
    got = sorted({s["n_ctx"] for s in listed})
    assert got == [per_slot], (
        f"slots have n_ctx {got}; -c {p.context} over {p.parallel} slots "
        f"(kv_unified={p.kv_unified}) gives {per_slot}"
    )


def test_batch_sizes_in_the_running_process(server: Server) -> None:
    """Micro-batch and batch of the running process are the profile's.

    Checklist: "tune -ub". Read from /proc/<MainPID>/cmdline, not the unit: at the pinned
    commit /props and /slots report neither batch size, and the server logs n_ubatch only
    at -lv 4.
    """
    p = server.cfg.profile
    got = (server.arg("-b", "--batch-size"), server.arg("-ub", "--ubatch-size"))
    assert got == (str(p.batch), str(p.micro_batch)), (
        f"running with -b {got[0]} -ub {got[1]}, profile -b {p.batch} -ub {p.micro_batch}"
    )


def test_model_is_memory_mapped_without_hugepages(server: Server, host: Any) -> None:
    """mmap left on, hugepages not required.

    Checklist: "Hugepages not required; leave mmap at its default". No --no-mmap in the
    running process, the model file is mapped into it (mmap in effect, not merely not
    disabled), and nothing it maps lives on a hugetlbfs.
    """
    assert "--no-mmap" not in server.cmdline, "llama-server runs with --no-mmap"
    maps = host.check_output("cat /proc/%s/maps", str(server.main_pid))
    model = server.arg("-m", "--model") or server.cfg.model_path
    assert any(line.endswith(" " + model) for line in maps.splitlines()), (
        f"{model} is not mapped into llama-server (pid {server.main_pid})"
    )
    mounts = host.file("/proc/mounts").content_string.splitlines()
    hugetlb = [m.split()[1] for m in mounts if len(m.split()) > 2 and m.split()[2] == "hugetlbfs"]
    on_hugepages = [line for line in maps.splitlines() if any(f" {d}/" in line for d in hugetlb)]
    assert not on_hugepages, f"llama-server maps hugetlbfs files: {on_hugepages[:3]}"


def test_sampling_defaults_read_back_from_the_live_server(server: Server) -> None:
    """The server's default sampling is the profile's (llama_sampling and its overrides).

    /props default_generation_settings.params: temperature, top_k, top_p, min_p,
    repeat_last_n, repeat_penalty, as the server applies them to a request that sets none.
    Compared as float32, the type llama.cpp keeps them in.
    """
    p = server.cfg.profile
    props = server.get("/props")
    assert props.status == 200, f"/props answered {props.status}"
    live = props.json()["default_generation_settings"]["params"]
    expected = {
        "temperature": p.temp,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "min_p": p.min_p,
        "repeat_last_n": p.repeat_last_n,
        "repeat_penalty": p.repeat_penalty,
    }
    wrong = {
        k: (live.get(k), v)
        for k, v in expected.items()
        if live.get(k) is None or abs(float(live[k]) - v) > 1e-6 * max(1.0, abs(v))
    }
    assert not wrong, f"/props default sampling (live, expected) differs: {wrong}"
