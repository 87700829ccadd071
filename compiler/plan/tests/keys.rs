//! Property tests for cache-key stability (issue 3, point 4):
//! plan twice → same keys; touch mtimes → same keys; change one byte of a copied file → that
//! layer and its descendants change, nothing else; reorder independent layers → same keys.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs::File;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use specc_plan::Options;

    #[derive(Debug, Clone)]
    enum Step {
        Run(u8),
        Copy(usize),
    }

    #[derive(Debug, Clone)]
    struct Layer {
        /// Indices of earlier layers; empty means `after="base"`.
        after: Vec<usize>,
        steps: Vec<Step>,
    }

    #[derive(Debug, Clone)]
    struct Case {
        files: Vec<Vec<u8>>,
        layers: Vec<Layer>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..4, 1usize..7).prop_flat_map(|(nfiles, nlayers)| {
            let files = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), nfiles);
            let layers: Vec<_> = (0..nlayers)
                .map(|i| {
                    let after = prop::collection::btree_set(0..i.max(1), 0..=i.min(2))
                        .prop_map(move |s| s.into_iter().filter(|p| *p < i).collect::<Vec<_>>());
                    let step = prop_oneof![
                        any::<u8>().prop_map(Step::Run),
                        (0..nfiles).prop_map(Step::Copy)
                    ];
                    (after, prop::collection::vec(step, 1..4))
                        .prop_map(|(after, steps)| Layer { after, steps })
                })
                .collect();
            (files, layers).prop_map(|(files, layers)| Case { files, layers })
        })
    }

    /// The spec text, layers written in `order`. Every layer has an explicit `after=`, so the
    /// DAG does not depend on the order.
    fn render(c: &Case, order: &[usize]) -> String {
        let mut s = String::from("spec \"prop\" {\n    base \"busybox\"\n");
        for &i in order {
            let l = &c.layers[i];
            let after = if l.after.is_empty() {
                "base".to_owned()
            } else {
                l.after
                    .iter()
                    .map(|p| format!("l{p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            s.push_str(&format!("    layer \"l{i}\" after=\"{after}\" {{\n"));
            for st in &l.steps {
                match st {
                    Step::Run(n) => s.push_str(&format!("        run \"echo {n}\"\n")),
                    Step::Copy(f) => s.push_str(&format!("        copy \"f{f}\" \"/dst/f{f}\"\n")),
                }
            }
            s.push_str("    }\n");
        }
        s.push_str("}\n");
        s
    }

    fn keys(dir: &Path, text: &str) -> BTreeMap<String, String> {
        let c = specc_plan::compile_str(&dir.join("spec.kdl"), text, &Options::default());
        let spec = c.spec.unwrap_or_else(|| {
            let d: Vec<String> = c.diagnostics.iter().map(|d| d.to_short(&c.files)).collect();
            panic!("did not plan:\n{}\n{text}", d.join("\n"))
        });
        spec.layers
            .iter()
            .map(|l| (l.name.clone(), l.key.to_prefixed()))
            .collect()
    }

    fn descendants(c: &Case, roots: &BTreeSet<usize>) -> BTreeSet<String> {
        let mut hit = roots.clone();
        // Parents have smaller indices, so one pass in index order closes the set.
        for (i, l) in c.layers.iter().enumerate() {
            if l.after.iter().any(|p| hit.contains(p)) {
                hit.insert(i);
            }
        }
        hit.into_iter().map(|i| format!("l{i}")).collect()
    }

    fn write_files(dir: &Path, c: &Case) {
        for (i, bytes) in c.files.iter().enumerate() {
            std::fs::write(dir.join(format!("f{i}")), bytes).expect("write");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn keys_are_stable_and_change_exactly_where_inputs_change(c in case(), which in any::<prop::sample::Index>(), perm_seed in any::<u64>()) {
            let dir = tempfile::tempdir().expect("tempdir");
            write_files(dir.path(), &c);
            let order: Vec<usize> = (0..c.layers.len()).collect();
            let text = render(&c, &order);
            let k0 = keys(dir.path(), &text);

            // Plan twice.
            prop_assert_eq!(&keys(dir.path(), &text), &k0);

            // Touch every file's mtime.
            for i in 0..c.files.len() {
                let f = File::options().write(true).open(dir.path().join(format!("f{i}"))).expect("open");
                f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(123_456)).expect("touch");
            }
            prop_assert_eq!(&keys(dir.path(), &text), &k0);

            // Reorder the layers in the file (a deterministic shuffle from the seed).
            let mut shuffled = order.clone();
            let mut seed = perm_seed | 1;
            for i in (1..shuffled.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let j = usize::try_from(seed % (i as u64 + 1)).expect("fits");
                shuffled.swap(i, j);
            }
            prop_assert_eq!(&keys(dir.path(), &render(&c, &shuffled)), &k0);

            // Change one byte of one file.
            let f = which.index(c.files.len());
            let mut bytes = c.files[f].clone();
            match bytes.first_mut() {
                Some(b) => *b = b.wrapping_add(1),
                None => bytes.push(0),
            }
            std::fs::write(dir.path().join(format!("f{f}")), &bytes).expect("write");
            let k1 = keys(dir.path(), &text);
            let copying: BTreeSet<usize> = c.layers.iter().enumerate()
                .filter(|(_, l)| l.steps.iter().any(|s| matches!(s, Step::Copy(x) if *x == f)))
                .map(|(i, _)| i)
                .collect();
            let expected = descendants(&c, &copying);
            let changed: BTreeSet<String> = k0.iter().filter(|(n, k)| k1[*n] != **k).map(|(n, _)| n.clone()).collect();
            prop_assert_eq!(changed, expected);
        }
    }
}
