"""tools/abuse.py, small: each case runs and counts what docs/reliability.md records."""

from maria_onnx.tools import abuse


def test_each_case_counts_what_the_clients_got(tmp_path):
    slow = abuse.slow_clients(half=8, max_connections=4, normal=2)
    assert slow["half_request_answers"] == {"503": 4, "408": 4} and slow["after_status"] == 200
    assert set(slow["normal_statuses"]) <= {200, 503} and sum(slow["normal_statuses"].values()) == 2
    left = abuse.left_mid_upload(3)
    assert left["counted_by_status"] == {"499": 3.0}
    assert abuse.oversized(1)["statuses"] == {413: 1}
    numbers = abuse.large_numbers()
    assert numbers["statuses"] == {400: numbers["requests"]}
    stop = abuse.stop_past_grace(12)  # 8 slots: at least 4 wait in the queue past the grace period
    assert set(stop["statuses"]) <= {200, 503} and stop["statuses"].get(503, 0) >= 4 and stop["exit"] == 0
    fuzzed = abuse.fuzz(40)
    assert sum(fuzzed["statuses"].values()) == 40 and all(200 <= s < 500 for s in fuzzed["statuses"])
    flood = abuse.queue_flood(24, 2)
    assert flood["statuses"].get(503, 0) > 0 and set(flood["statuses"]) <= {200, 503}
    drained = abuse.drain(4)
    assert drained["statuses"] == {200: 4}
    commands = abuse.cli_fuzz(10)
    assert sum(commands["exit_codes"].values()) == 10
    messages = abuse.grpc_fuzz(20)
    assert sum(messages["codes"].values()) == 20 and not {"UNKNOWN", "INTERNAL"} & set(messages["codes"])
    soaked = abuse.soak(2, 2)
    assert set(soaked["statuses"]) == {200} and len(soaked["rss_mib_first_last_max"]) == 3
    for case in (slow, left, numbers, stop, fuzzed, flood, drained, commands, messages, soaked):
        assert case["tracebacks"] == 0 and case["exit"] == 0


def test_a_killed_export_leaves_a_bundle_in_place_or_set_aside(tmp_path):
    killed = abuse.export_kills(2)
    assert killed["after_each"].get("lost", 0) == 0 and killed["last_export"] == 0 and killed["left_over"] == []
