"""The wireless network model (issue 18, part 1): formulas against hand-computed values,
seeded channels, and a run that logs what each round costs in seconds and joules."""

from __future__ import annotations

import json
import math

import pytest

from sfedlora.comm.network import (
    WirelessNetwork,
    bandwidth_for_rate,
    dbm_to_watts,
    min_max_split,
    path_loss_db,
    rate_bps,
)
from sfedlora.config import ConfigError, NetworkConfig


def test_rate_and_path_loss_equal_their_formulas():
    # 23 dBm = 0.19953 W; -174 dBm/Hz = 3.981e-21 W/Hz; at 1 km the path loss is 128.1 dB
    p, n0 = dbm_to_watts(23), dbm_to_watts(-174)
    assert p == pytest.approx(0.199526, rel=1e-5) and n0 == pytest.approx(3.98107e-21,
                                                                           rel=1e-5)
    assert path_loss_db(1000) == pytest.approx(128.1, abs=1e-12)
    assert path_loss_db(100) == pytest.approx(128.1 - 37.6, abs=1e-12)
    h = 10 ** (-128.1 / 10)
    snr = p * h / (1e6 * n0)  # 1 MHz: 0.0774... at the cell edge of a 1 km cell
    assert rate_bps(1e6, p, h, n0) == pytest.approx(1e6 * math.log2(1 + snr), rel=1e-12)
    assert rate_bps(0.0, p, h, n0) == 0.0


def test_least_bandwidth_for_a_rate_inverts_the_rate():
    p, n0, h = 0.2, 4e-21, 1e-12
    b = bandwidth_for_rate(2e6, 20e6, p, h, n0)
    assert rate_bps(b, p, h, n0) == pytest.approx(2e6, rel=1e-9)
    ceiling = p * h / (n0 * math.log(2))  # the rate as bandwidth grows without bound
    assert bandwidth_for_rate(1.01 * ceiling, 1e12, p, h, n0) is None
    assert bandwidth_for_rate(0, 20e6, p, h, n0) == 0.0


def test_min_max_split_equalises_finish_times_in_the_band():
    p, n0 = 0.2, 4e-21
    gains, bits, fixed = [1e-11, 1e-13], [8e6, 8e6], [0.5, 0.1]
    split = min_max_split(bits, fixed, 20e6, p, gains, n0)
    finish = [f + b / rate_bps(w, p, g, n0)
              for b, f, w, g in zip(bits, fixed, split, gains, strict=True)]
    assert sum(split) <= 20e6 * (1 + 1e-12)
    assert finish[0] == pytest.approx(finish[1], rel=1e-6)
    equal = [f + b / rate_bps(10e6, p, g, n0) for b, f, g in zip(bits, fixed, gains,
                                                                   strict=True)]
    assert max(finish) < max(equal)  # the weaker channel got more of the band
    assert split[1] > split[0]


def test_a_lone_client_gets_the_whole_band_even_where_rounding_bites():
    # f + b / R(B) - f is not b / R(B) in floating point: this case once failed an
    # internal assertion instead of returning the whole band
    fixed, gain = 0.6718331089469212, 1.5233018666688375e-13
    assert min_max_split([1e5], [fixed], 1e6, 0.2, [gain], 4e-21) == [1e6]
    split = min_max_split([0.0, 1e5], [0.1, fixed], 1e6, 0.2, [1e-12, gain], 4e-21)
    assert split[0] == 0.0 and split[1] == pytest.approx(1e6, rel=1e-12)


def test_channels_are_seeded_per_round_and_client():
    cfg = NetworkConfig(model="wireless")
    a, b = WirelessNetwork(cfg, 3, 4, 1000), WirelessNetwork(cfg, 3, 4, 1000)
    assert a.placements == b.placements
    assert a.gain(2, 5) == b.gain(2, 5) and a.gain(2, 5) != a.gain(2, 6)
    assert all(10 <= pl.distance_m <= 500 and 1 <= pl.tflops <= 10 for pl in a.placements)
    assert WirelessNetwork(cfg, 4, 4, 1000).placements != a.placements


def test_a_wireless_run_logs_seconds_that_match_its_bytes(tiny_config, tmp_path):
    from sfedlora.runtime.simulation import Simulation

    cfg = tiny_config("method=sfed", "rounds=2", "network.model=wireless",
                      "network.allocation=min_max", f"output_dir={tmp_path / 'run'}")
    Simulation(cfg).run()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    total = 0.0
    for m in lines:
        up = m["bytes_up_per_client"]
        assert set(m["upload_seconds_per_client"]) == set(up)
        for c, seconds in m["upload_seconds_per_client"].items():
            # the upload time is the logged payload's bits over the client's rate
            assert seconds * m["rate_bps_per_client"][c] / 8 == pytest.approx(up[c],
                                                                              rel=1e-9)
            assert m["energy_joules_per_client"][c] == pytest.approx(
                dbm_to_watts(23) * seconds, rel=1e-12)
        finish = [m["download_seconds_per_client"][c] + m["compute_seconds_per_client"][c]
                  + m["upload_seconds_per_client"][c] for c in up]
        assert m["latency_seconds"] == pytest.approx(max(finish), rel=1e-12)
        assert sum(m["bandwidth_hz_per_client"].values()) <= 20e6 * (1 + 1e-9)
        total += m["latency_seconds"]
        assert m["simulated_seconds"] == pytest.approx(total, rel=1e-12)
        assert all(s > 0 for s in m["compute_seconds_per_client"].values())


@pytest.mark.parametrize(("overrides", "message"), [
    (["network.bandwidth_hz=-1"], "network.bandwidth_hz"),
    (["network.model=wireless", "network.client_tflops=[5,1]"], "network.client_tflops"),
    (["network.downlink_bps=1e6"], "network.downlink_bps set with network.model=none"),
])
def test_bad_network_settings_stop_before_the_run(overrides, message, tiny_config):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_download_seconds_are_the_payloads_bits_over_the_downlink_rate(tiny_config):
    """8 * bytes / rate, with the bytes the round logged (a download priced in bytes
    instead of bits is 8x too fast)."""
    from sfedlora.runtime.simulation import Simulation

    cfg = tiny_config("method=fedit", "rounds=1", "network.model=wireless",
                      "network.downlink_bps=1e6")
    m = Simulation(cfg).run_round(1).metrics
    assert m["download_seconds_per_client"]
    for c, seconds in m["download_seconds_per_client"].items():
        assert seconds == 8 * m["bytes_down_per_client"][c] / 1e6


def test_a_resumed_wireless_run_continues_the_simulated_clock(tiny_config, tmp_path):
    """Three rounds in one go, and two rounds then a resume for the third: the clock at
    round 3 is the sum of the three rounds' latencies either way (a resume that
    restarted the clock would read only round 3's)."""
    from sfedlora.runtime.results import RunDir
    from sfedlora.runtime.simulation import Simulation

    args = ("method=fedit", "rounds=3", "network.model=wireless")
    whole = tiny_config(*args, f"output_dir={tmp_path / 'whole'}")
    Simulation(whole).run()
    lines = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    parted = tiny_config(*args, f"output_dir={tmp_path / 'parted'}")
    first = Simulation(parted)
    for r in (1, 2):
        first.run_round(r)
    run_dir = RunDir(tmp_path / "parted")
    run_dir.start(parted, first.info.label_names)
    run_dir.save_checkpoint(first.checkpoint(2, 0.0, []))
    resumed = Simulation.resume(tmp_path / "parted")
    assert resumed.run_round(3).metrics["simulated_seconds"] == pytest.approx(
        sum(m["latency_seconds"] for m in lines), rel=1e-12)
    assert lines[-1]["simulated_seconds"] == pytest.approx(
        sum(m["latency_seconds"] for m in lines), rel=1e-12)
