//! Exact statistics over raw samples: nearest-rank percentiles of one sample's latencies, the
//! median over repeats, and ratios against `direct`.

/// The percentiles every latency figure reports.
pub const PERCENTILES: [(&str, f64); 4] =
    [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)];

/// The nearest-rank `q`-quantile (0 < q ≤ 1) of `sorted` (ascending): the smallest sample
/// with at least `q` of all samples at or below it. `None` when empty.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // The rank is computed in integers where q is exact to 1/1000, so p99 of 100 samples is
    // the 99th (float products like 0.99 * 100 would round up to the 100th).
    let n = sorted.len() as u64;
    let per_mille = (q * 1000.0).round() as u64;
    let rank = (per_mille * n).div_ceil(1000).clamp(1, n);
    Some(sorted[usize::try_from(rank - 1).expect("rank fits")])
}

/// The four reported percentiles of `samples` (sorted here), in ns.
pub fn latency_percentiles(samples: &[u64]) -> Vec<(&'static str, Option<u64>)> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    PERCENTILES
        .iter()
        .map(|&(name, q)| (name, percentile(&sorted, q)))
        .collect()
}

/// The median of the present values: the middle one, or the mean of the two middle ones.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The lowest and highest of `values` (finite ones), when there are at least two.
pub fn range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.len() < 2 {
        return None;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo, hi))
}

/// `value / direct`, when both exist and `direct` is not zero.
pub fn ratio(value: Option<f64>, direct: Option<f64>) -> Option<f64> {
    match (value, direct) {
        (Some(v), Some(d)) if d != 0.0 => Some(v / d),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), Some(500));
        assert_eq!(percentile(&samples, 0.9), Some(900));
        assert_eq!(percentile(&samples, 0.99), Some(990));
        assert_eq!(percentile(&samples, 0.999), Some(999));
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 0.99), Some(99));
        assert_eq!(percentile(&hundred, 0.999), Some(100));
        assert_eq!(percentile(&[7], 0.5), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn latency_percentiles_sort_first() {
        let got = latency_percentiles(&[30, 10, 20, 40]);
        assert_eq!(
            got,
            vec![
                ("p50", Some(20)),
                ("p90", Some(40)),
                ("p99", Some(40)),
                ("p999", Some(40))
            ]
        );
    }

    #[test]
    fn median_of_odd_even_and_missing() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median([]), None);
    }

    #[test]
    fn ratio_needs_both_and_a_nonzero_direct() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }
}
