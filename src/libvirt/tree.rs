//! The parent/child relations of a set of snapshots.

use std::collections::{BTreeMap, BTreeSet};

use super::{DomainSnapshot, one_line};

/// The parent/child relations of a set of snapshots (`<parent><name>`).
///
/// Snapshots whose parent is absent, unknown or themselves are roots. Names are unique: of several
/// snapshots with the same name the first one counts. Cycles in the parent links (which libvirt
/// never writes) do not make any method loop: [`SnapshotTree::render_tree`] shows every snapshot
/// once, starting a cycle at its smallest name.
#[derive(Debug, Clone, Default)]
pub struct SnapshotTree {
    parents: BTreeMap<String, Option<String>>,
    children: BTreeMap<String, Vec<String>>,
    roots: Vec<String>,
}

impl SnapshotTree {
    /// Builds the tree; roots and children are sorted by name, as virsh shows them.
    pub fn new(snapshots: &[DomainSnapshot]) -> Self {
        let mut parents: BTreeMap<String, Option<String>> = BTreeMap::new();
        for s in snapshots {
            parents
                .entry(s.name.clone())
                .or_insert_with(|| s.parent.clone());
        }
        let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut roots = Vec::new();
        // BTreeMap iteration is by name, so every list comes out sorted.
        for (name, parent) in &parents {
            match parent {
                Some(p) if p != name && parents.contains_key(p) => {
                    children.entry(p.clone()).or_default().push(name.clone());
                }
                _ => roots.push(name.clone()),
            }
        }
        SnapshotTree {
            parents,
            children,
            roots,
        }
    }

    /// Number of snapshots.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    /// Whether there are no snapshots.
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    /// Whether a snapshot of that name is in the tree.
    pub fn contains(&self, name: &str) -> bool {
        self.parents.contains_key(name)
    }

    /// The snapshots without a (known) parent, sorted by name.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The direct children of `name`, sorted by name (empty if none or unknown).
    pub fn children(&self, name: &str) -> &[String] {
        self.children.get(name).map_or(&[], Vec::as_slice)
    }

    /// The parent `name` declares (`<parent><name>`), whether or not that snapshot is known.
    pub fn parent(&self, name: &str) -> Option<&str> {
        self.parents.get(name)?.as_deref()
    }

    /// Number of snapshots below `name` (children, their children, ...), like virsh's
    /// "Descendants".
    pub fn descendants(&self, name: &str) -> usize {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        seen.insert(name);
        let mut todo: Vec<&str> = vec![name];
        let mut count = 0;
        while let Some(n) = todo.pop() {
            for c in self.children(n) {
                if seen.insert(c) {
                    count += 1;
                    todo.push(c);
                }
            }
        }
        count
    }

    /// The tree drawn like `virsh snapshot-list --tree` (trailing blanks of each line and the final
    /// empty line removed):
    ///
    /// ```text
    /// bare-os-install
    ///   |
    ///   +- pkg-updated
    ///   |   |
    ///   |   +- 1270477159
    ///   |
    ///   +- other
    /// ```
    ///
    /// Control characters in names are escaped so that every snapshot takes one line.
    pub fn render_tree(&self) -> String {
        // First a spanning forest (each snapshot drawn once, even with cycles), then the drawing.
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut forest: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut tops: Vec<&str> = Vec::new();
        let starts = self
            .roots
            .iter()
            .map(String::as_str)
            .chain(self.parents.keys().map(String::as_str));
        for start in starts {
            if !seen.insert(start) {
                continue;
            }
            tops.push(start);
            let mut todo = vec![start];
            while let Some(n) = todo.pop() {
                for c in self.children(n) {
                    if seen.insert(c) {
                        forest.entry(n).or_default().push(c);
                        todo.push(c);
                    }
                }
            }
        }
        for kids in forest.values_mut() {
            kids.sort_unstable();
        }

        // virsh's algorithm (vshTreePrint), made iterative.
        struct Frame<'a> {
            name: &'a str,
            last: bool,
            root: bool,
            indent: String,
        }
        let mut lines: Vec<String> = Vec::new();
        for top in tops {
            let mut stack = vec![Frame {
                name: top,
                last: true,
                root: true,
                indent: String::new(),
            }];
            while let Some(f) = stack.pop() {
                let prefix = if f.root { "" } else { "+- " };
                lines.push(format!("{}{}{}", f.indent, prefix, one_line(f.name)));
                let mut indent = f.indent;
                if !f.root {
                    indent.push_str(if f.last { "  " } else { "| " });
                }
                let kids = forest.get(f.name).map_or(&[][..], Vec::as_slice);
                if kids.is_empty() {
                    if f.last {
                        lines.push(indent);
                    }
                    continue;
                }
                lines.push(format!("{indent}  |"));
                let child_indent = format!("{indent}  ");
                for (i, kid) in kids.iter().enumerate().rev() {
                    stack.push(Frame {
                        name: kid,
                        last: i + 1 == kids.len(),
                        root: false,
                        indent: child_indent.clone(),
                    });
                }
            }
        }
        while lines.last().is_some_and(|l| l.trim_end().is_empty()) {
            lines.pop();
        }
        let mut out = String::new();
        for l in lines {
            out.push_str(l.trim_end());
            out.push('\n');
        }
        out
    }
}
