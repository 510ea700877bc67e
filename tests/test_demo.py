"""The README's demo: SVI must beat MAP on test NLL and widen its bands in the gap."""

from pbnn.apps.demo import main


def test_demo_svi_beats_map(tmp_path, capsys):
    rows = main(["--out", str(tmp_path), "--methods", "map,svi,laplace"])
    assert rows["svi"]["nll"] < rows["map"]["nll"]
    assert rows["svi"]["gap_sd"] > 1.5 * rows["map"]["gap_sd"]
    assert rows["laplace"]["nll"] < rows["map"]["nll"]
    assert rows["laplace"]["gap_sd"] > 1.5 * rows["map"]["gap_sd"]
    assert (tmp_path / "predictive_bands.png").stat().st_size > 10_000
    assert (tmp_path / "svi_forest.png").stat().st_size > 10_000
    assert (tmp_path / "svi_calibration.png").stat().st_size > 10_000
    assert {"crps", "pit_error", "coverage_90"} <= set(rows["svi"])
    assert "SVI beats MAP" in capsys.readouterr().out
