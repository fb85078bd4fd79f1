"""marl_llm.stats: intervals checked against textbook values and their defining properties."""
import random

import pytest

from marl_llm.stats import (Interval, interval_from_metrics, interval_metrics, mean_interval, paired_difference,
                            t_quantile, wilson_interval, z_quantile)


@pytest.mark.parametrize("k,n,low,high", [
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe_table(k, n, low, high):
    iv = wilson_interval(k, n)
    assert iv.estimate == pytest.approx(k / n)
    assert iv.low == pytest.approx(low, abs=5e-5) and iv.high == pytest.approx(high, abs=5e-5)
    assert iv.n == n


def test_wilson_fair_coin_covers_half_and_shrinks_with_n():
    widths = []
    for n in (10, 100, 1000):
        k = round(n / 2 + (n ** 0.5) / 2)  # one standard deviation above the mean of a fair coin
        iv = wilson_interval(k, n)
        assert iv.low < 0.5 < iv.high, (k, n, iv)
        widths.append(iv.high - iv.low)
    assert widths[0] > widths[1] > widths[2]
    # symmetric around one half exactly at k = n/2
    iv = wilson_interval(50, 100)
    assert iv.low == pytest.approx(1 - iv.high)


def test_wilson_coverage_near_nominal():
    """Over many simulated fair-coin experiments the 95% interval covers 0.5 about 95% of the time."""
    rng = random.Random(1)
    hits = sum(wilson_interval(k, 40).low <= 0.5 <= wilson_interval(k, 40).high
               for k in (sum(rng.random() < 0.5 for _ in range(40)) for _ in range(2000)))
    assert 0.92 < hits / 2000 < 0.98


@pytest.mark.parametrize("conf,df,value", [(0.95, 1, 12.706), (0.95, 10, 2.228), (0.99, 5, 4.032),
                                           (0.90, 20, 1.725), (0.95, 30, 2.042)])
def test_t_quantile_matches_tables(conf, df, value):
    assert t_quantile(conf, df) == pytest.approx(value, abs=1e-3)


def test_t_tends_to_normal():
    assert t_quantile(0.95, 100_000) == pytest.approx(z_quantile(0.95), abs=1e-3)
    assert z_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_mean_interval_known_values():
    iv = mean_interval([1, 2, 3, 4, 5])  # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776
    half = 2.7764451 * (2.5 ** 0.5) / 5 ** 0.5
    assert iv.estimate == 3 and iv.low == pytest.approx(3 - half) and iv.high == pytest.approx(3 + half)
    one = mean_interval([0.7])
    assert one.estimate == 0.7 and one.n == 1 and one.low != one.low  # nan: no spread from one value
    assert str(one) == "0.70 [no interval], n=1"


def test_paired_difference_identical_is_zero_width():
    a = [1, 0, 1, 1, 0, 0, 1]
    iv = paired_difference(a, list(a))
    assert (iv.estimate, iv.low, iv.high, iv.n) == (0, 0, 0, 7)
    assert str(iv) == "+0.00 [+0.00, +0.00], n=7"


def test_paired_difference_uses_pairing():
    """Hard tasks fail for both policies: pairing removes that spread, so the paired interval is
    narrower than the one from the two means' own intervals, and it excludes zero here."""
    rng = random.Random(2)
    easy = [rng.random() < 0.5 for _ in range(400)]
    a = [float(e or rng.random() < 0.1) for e in easy]   # a solves the easy tasks and 10% of the rest
    b = [float(e) for e in easy]
    iv = paired_difference(a, b)
    assert iv.estimate == pytest.approx(sum(a) / 400 - sum(b) / 400)
    assert 0 < iv.low < iv.estimate < iv.high
    ia, ib = mean_interval(a), mean_interval(b)
    assert (iv.high - iv.low) < (ia.high - ia.low) + (ib.high - ib.low)
    assert paired_difference(b, a).estimate == pytest.approx(-iv.estimate)


def test_format():
    assert str(Interval(0.0912, 0.0401, 0.1403, 400, signed=True)) == "+0.09 [+0.04, +0.14], n=400"
    assert str(Interval(-0.05, -0.1, 0.0, 12, signed=True)) == "-0.05 [-0.10, +0.00], n=12"
    assert wilson_interval(5, 16).format(3) == "0.312 [0.142, 0.556], n=16"


def test_interval_metrics_keys_round_trip():
    iv = wilson_interval(3, 4)
    m = interval_metrics("eval/acc", iv)
    assert set(m) == {"eval/acc", "eval/acc/ci_low", "eval/acc/ci_high", "eval/acc/n"}
    assert m["eval/acc/n"] == 4 and m["eval/acc/ci_low"] < 0.75 < m["eval/acc/ci_high"]
    assert interval_from_metrics(m, "eval/acc") == iv
    del m["eval/acc/n"]
    assert str(interval_from_metrics(m, "eval/acc")) == "0.75 [0.30, 0.95]"  # size unknown: not printed
    assert interval_from_metrics({"eval/acc": 0.5}, "eval/acc") is None


@pytest.mark.parametrize("call,match", [
    (lambda: wilson_interval(5, 4), "0 <= k <= n"),
    (lambda: wilson_interval(1, 0), "n > 0"),
    (lambda: wilson_interval(1.5, 4), "integer"),
    (lambda: wilson_interval(1, 4, conf=1.0), "conf=1.0"),
    (lambda: mean_interval([]), "at least one value"),
    (lambda: mean_interval([1.0, float("nan")]), "non-finite"),
    (lambda: paired_difference([1, 0], [1]), "same tasks"),
    (lambda: t_quantile(0.95, 0), "df=0"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- reading the convention back ----------------------------------------------------------------------
def test_diff_key_and_reading_back():
    from marl_llm.stats import comparison_lines, diff_key, differences, read_intervals
    assert diff_key("acc/final", "acc/untrained_final") == "diff/acc/final-acc/untrained_final"
    with pytest.raises(ValueError, match="free of '-'"):
        diff_key("a-b", "c")
    m = {"eval/step": 3, **interval_metrics("eval/acc", wilson_interval(3, 4)),
         **interval_metrics("eval/" + diff_key("acc", "base/acc"), Interval(0.0912, 0.0401, 0.1403, 400, signed=True)),
         "eval/gens": 2.0, "eval/half/ci_low": 0.1}  # no ci_high / n: no interval
    ivs = read_intervals(m, "eval/")
    assert list(ivs) == ["acc", "diff/acc-base/acc"]
    assert ivs["acc"] == wilson_interval(3, 4) and ivs["diff/acc-base/acc"].signed
    assert differences(m, "eval/") == [("acc", "base/acc", ivs["diff/acc-base/acc"])]
    assert comparison_lines(m, "eval/") == ["acc - base/acc = +0.09 [+0.04, +0.14], n=400"]
    assert comparison_lines({}) == []
