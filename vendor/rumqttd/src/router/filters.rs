//! pickupd patch: subscription filters kept by level, so the filters a published topic
//! matches are found by walking the topic's levels.
//!
//! Upstream tested every filter against each topic it had not seen before and cached the
//! answer per topic for good: with 10 000 handhelds subscribed to their own job topic, a
//! topic never seen before (one call state per call) cost the router about 185 µs, and the
//! cache grew with every topic ever published (bounded since patch 2, at up to 10 MiB).
//! Walking the levels costs a few lookups whatever the number of filters, and the memory
//! follows the filters, not the topics.

use std::collections::HashMap;

use super::FilterIdx;

/// Literal levels up to this many children are searched in a vector; past it a node's
/// children move to a hash map. Most levels have one child (`couriers/<cid>/job`).
const FEW: usize = 8;

/// The subscription filters, by level.
#[derive(Default)]
pub(crate) struct FilterTree {
    root: Node,
}

#[derive(Default)]
struct Node {
    /// The filter that ends at this level.
    here: Option<FilterIdx>,
    /// The filters `<this level>/#`: they match this level and every level below. More
    /// than one only when filters go on past their `#` (`a/#/b` is `a/#` here, as in
    /// `protocol::matches`; the broker does not refuse such filters).
    rest: Vec<FilterIdx>,
    /// The next level is `+`.
    any: Option<Box<Node>>,
    /// The next level is a literal one.
    children: Children,
}

enum Children {
    Few(Vec<(Box<str>, Node)>),
    Many(HashMap<Box<str>, Node>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    fn get(&self, level: &str) -> Option<&Node> {
        match self {
            Children::Few(v) => v.iter().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut Node {
        if let Children::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(l, _)| &**l == level) {
                let many = std::mem::take(v).into_iter().collect();
                *self = Children::Many(many);
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(l, _)| &**l == level) {
                    Some(i) => i,
                    None => {
                        v.push((level.into(), Node::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(level.into()).or_default(),
        }
    }
}

impl FilterTree {
    /// Adds `filter` as `idx`; each filter is added once. Like `protocol::matches`, a `#`
    /// level ends the filter wherever it stands.
    pub fn insert(&mut self, filter: &str, idx: FilterIdx) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            match level {
                "#" => {
                    node.rest.push(idx);
                    return;
                }
                "+" => node = node.any.get_or_insert_with(Box::default),
                _ => node = node.children.get_or_insert(level),
            }
        }
        node.here = Some(idx);
    }

    /// Appends to `out` every filter that matches `topic`, each once, exactly those
    /// `protocol::matches` accepts. Iterative: a topic or filter of thousands of levels
    /// does not deepen the router's stack.
    pub fn matches(&self, topic: &str, out: &mut Vec<FilterIdx>) {
        if topic.starts_with('$') {
            return;
        }
        let mut stack: Vec<(&Node, Option<&str>)> = vec![(&self.root, Some(topic))];
        while let Some((node, remaining)) = stack.pop() {
            out.extend_from_slice(&node.rest);
            let Some(remaining) = remaining else {
                out.extend(node.here);
                continue;
            };
            let (level, next) = match remaining.split_once('/') {
                Some((level, next)) => (level, Some(next)),
                None => (remaining, None),
            };
            if let Some(child) = node.children.get(level) {
                stack.push((child, next));
            }
            // A topic level `#` is not matched by `+` (as in `protocol::matches`).
            if level != "#" {
                if let Some(any) = &node.any {
                    stack.push((any, next));
                }
            }
        }
    }
}

impl Drop for FilterTree {
    /// Node by node: dropping a filter of thousands of levels recursively would use as
    /// many stack frames.
    fn drop(&mut self) {
        let mut stack = vec![std::mem::take(&mut self.root)];
        while let Some(mut node) = stack.pop() {
            if let Some(any) = node.any.take() {
                stack.push(*any);
            }
            match std::mem::take(&mut node.children) {
                Children::Few(v) => stack.extend(v.into_iter().map(|(_, n)| n)),
                Children::Many(m) => stack.extend(m.into_values()),
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::FilterTree;
    use crate::protocol::matches;

    /// Every filter and topic of up to three (filters) or four (topics) levels over an
    /// alphabet with the awkward cases: empty levels, wildcards in topics, `$` topics, a
    /// level starting with a character of more than one byte.
    fn all(levels: &[&str], max: usize) -> Vec<String> {
        let mut out: Vec<String> = levels.iter().map(|l| l.to_string()).collect();
        let mut last = out.clone();
        for _ in 1..max {
            let next: Vec<String> = last
                .iter()
                .flat_map(|p| levels.iter().map(move |l| format!("{p}/{l}")))
                .collect();
            out.extend(next.iter().cloned());
            last = next;
        }
        out
    }

    #[test]
    fn answers_exactly_what_matching_each_filter_answers() {
        let filters = all(&["a", "é", "", "+", "#"], 3);
        let topics = all(&["a", "é", "", "+", "#", "$x"], 4);
        let mut tree = FilterTree::default();
        for (i, f) in filters.iter().enumerate() {
            tree.insert(f, i);
        }
        let mut got = Vec::new();
        for t in &topics {
            got.clear();
            tree.matches(t, &mut got);
            got.sort_unstable();
            let want: Vec<usize> = (0..filters.len())
                .filter(|&i| matches(t, &filters[i]))
                .collect();
            assert_eq!(got, want, "topic {t:?}");
        }
    }

    #[test]
    fn many_siblings_move_to_a_map_and_stay_found() {
        let mut tree = FilterTree::default();
        for i in 0..1000 {
            tree.insert(&format!("couriers/c{i}/job"), i);
        }
        tree.insert("couriers/+/job", 1000);
        let mut got = Vec::new();
        for i in 0..1000 {
            got.clear();
            tree.matches(&format!("couriers/c{i}/job"), &mut got);
            got.sort_unstable();
            assert_eq!(got, vec![i, 1000]);
        }
        got.clear();
        tree.matches("couriers/c1000/job", &mut got);
        assert_eq!(got, vec![1000]);
    }

    #[test]
    fn a_filter_of_many_levels_needs_no_deep_stack() {
        let deep = vec!["a"; 40_000].join("/");
        let run = move || {
            let mut tree = FilterTree::default();
            tree.insert(&deep, 1);
            tree.insert(&format!("{deep}/#"), 2);
            let mut got = Vec::new();
            tree.matches(&deep, &mut got);
            got.sort_unstable();
            assert_eq!(got, vec![1, 2]);
            drop(tree);
        };
        let small = std::thread::Builder::new().stack_size(64 * 1024);
        let joined = small.spawn(run).map(|h| h.join());
        assert!(matches!(joined, Ok(Ok(()))));
    }
}
