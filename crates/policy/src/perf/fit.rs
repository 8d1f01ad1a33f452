//! Least-squares fits of the decode and prefill time models, with
//! non-negative coefficients and relative-error weighting.

/// Solve the weighted least-squares problem `min Σ w_i (x_i·β − y_i)²` with
/// `β ≥ 0`, by dropping the most negative coefficient and refitting until
/// none is negative (exact for the small, well-conditioned designs used
/// here). Returns `None` when the
/// design is singular.
pub(crate) fn nnls(rows: &[Vec<f64>], y: &[f64], w: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut active: Vec<bool> = vec![true; k];
    loop {
        let cols: Vec<usize> = (0..k).filter(|&j| active[j]).collect();
        if cols.is_empty() {
            return Some(vec![0.0; k]);
        }
        let n = cols.len();
        let mut a = vec![vec![0.0; n + 1]; n];
        for ((row, &yi), &wi) in rows.iter().zip(y).zip(w) {
            for (p, &cp) in cols.iter().enumerate() {
                for (q, &cq) in cols.iter().enumerate() {
                    a[p][q] += wi * row[cp] * row[cq];
                }
                a[p][n] += wi * row[cp] * yi;
            }
        }
        let sol = solve(a)?;
        let mut beta = vec![0.0; k];
        let mut worst: Option<(usize, f64)> = None;
        for (p, &c) in cols.iter().enumerate() {
            beta[c] = sol[p];
            if sol[p] < 0.0 && worst.is_none_or(|(_, v)| sol[p] < v) {
                worst = Some((c, sol[p]));
            }
        }
        match worst {
            None => return Some(beta),
            Some((c, _)) => active[c] = false,
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented `n × (n+1)` matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for i in 0..n {
        let p = (i..n).max_by(|&r, &s| a[r][i].abs().total_cmp(&a[s][i].abs()))?;
        if a[p][i].abs() < 1e-300 {
            return None;
        }
        a.swap(i, p);
        let pivot_row = a[i].clone();
        for row in a.iter_mut().skip(i + 1) {
            let f = row[i] / pivot_row[i];
            for (cell, p) in row.iter_mut().zip(&pivot_row).skip(i) {
                *cell -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let mut s = a[i][n];
        for c in i + 1..n {
            s -= a[i][c] * x[c];
        }
        x[i] = s / a[i][i];
        if !x[i].is_finite() {
            return None;
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_linear_model() {
        let rows: Vec<Vec<f64>> = (1..10).map(|i| vec![1.0, i as f64]).collect();
        let y: Vec<f64> = (1..10).map(|i| 2.0 + 0.5 * i as f64).collect();
        let w = vec![1.0; 9];
        let b = nnls(&rows, &y, &w, 2).unwrap();
        assert!((b[0] - 2.0).abs() < 1e-9 && (b[1] - 0.5).abs() < 1e-9);
    }

    #[test]
    fn negative_coefficients_are_dropped() {
        let rows: Vec<Vec<f64>> = (1..10).map(|i| vec![1.0, i as f64]).collect();
        let y: Vec<f64> = (1..10).map(|i| 10.0 - 0.5 * i as f64).collect();
        let b = nnls(&rows, &y, &[1.0; 9], 2).unwrap();
        assert_eq!(b[1], 0.0);
        assert!(b[0] > 0.0);
    }
}
