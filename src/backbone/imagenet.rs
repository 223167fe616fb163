//! ImageNet-1k class names (`models/imagenet_classes.txt`, from torchvision) and top-k.

/// The 1000 class names, by class index.
pub fn class_names() -> Vec<&'static str> {
    include_str!("../../models/imagenet_classes.txt")
        .lines()
        .collect()
}

/// The `k` largest entries of `scores` as (index, score), largest first; ties to the lower index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|i| (i, scores[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_top_k() {
        let names = class_names();
        assert_eq!(names.len(), 1000);
        assert_eq!(names[281], "tabby");
        assert_eq!(names[967], "espresso");
        assert_eq!(
            top_k(&[0.1, 0.5, 0.5, 0.2], 3),
            vec![(1, 0.5), (2, 0.5), (3, 0.2)]
        );
    }
}
