//! Routing: which endpoints want a click. It owns the [`RoutingIndex`], built from the
//! enabled endpoints, that maps link ids and workspace ids to endpoint keys so matching
//! costs O(matched endpoints), not O(all endpoints). It must not do I/O or hold endpoint
//! state beyond filters: a new index is built and swapped in whenever endpoints change.

use crate::config::EndpointConfig;
use crate::log::EndpointKey;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Target {
    key: EndpointKey,
    include_bots: bool,
    /// Set for an endpoint indexed by link that also filters on workspaces.
    workspaces: Option<Arc<HashSet<String>>>,
}

impl Target {
    fn admits(&self, workspace_id: Option<&str>, is_bot: bool) -> bool {
        if is_bot && !self.include_bots {
            return false;
        }
        match &self.workspaces {
            None => true,
            Some(set) => workspace_id.is_some_and(|w| set.contains(w)),
        }
    }
}

/// The facts of a click that routing looks at. Ids are compared as text.
#[derive(Debug, Clone, Copy)]
pub struct ClickFacts<'a> {
    pub link_id: &'a str,
    pub workspace_id: Option<&'a str>,
    pub is_bot: bool,
}

#[derive(Debug, Default)]
pub struct RoutingIndex {
    by_link: HashMap<String, Vec<Target>>,
    by_workspace: HashMap<String, Vec<Target>>,
    everyone: Vec<Target>,
}

impl RoutingIndex {
    /// Indexes the given endpoints; disabled ones are left out.
    pub fn build<'a>(endpoints: impl IntoIterator<Item = (EndpointKey, &'a EndpointConfig)>) -> Self {
        let mut index = RoutingIndex::default();
        for (key, ep) in endpoints {
            if !ep.enabled {
                continue;
            }
            let workspaces: HashSet<String> = ep.workspaces.iter().cloned().collect();
            if !ep.links.is_empty() {
                let filter = (!workspaces.is_empty()).then(|| Arc::new(workspaces));
                let links: HashSet<&String> = ep.links.iter().collect();
                for link in links {
                    let target = Target {
                        key,
                        include_bots: ep.include_bots,
                        workspaces: filter.clone(),
                    };
                    index.by_link.entry(link.clone()).or_default().push(target);
                }
            } else if !workspaces.is_empty() {
                for ws in workspaces {
                    let target = Target {
                        key,
                        include_bots: ep.include_bots,
                        workspaces: None,
                    };
                    index.by_workspace.entry(ws).or_default().push(target);
                }
            } else {
                index.everyone.push(Target {
                    key,
                    include_bots: ep.include_bots,
                    workspaces: None,
                });
            }
        }
        index
    }

    /// Appends the keys of every endpoint that wants this click to `out`.
    pub fn route(&self, click: ClickFacts<'_>, out: &mut Vec<EndpointKey>) {
        let admitted = |t: &&Target| t.admits(click.workspace_id, click.is_bot);
        out.extend(self.everyone.iter().filter(admitted).map(|t| t.key));
        if let Some(targets) = self.by_link.get(click.link_id) {
            out.extend(targets.iter().filter(admitted).map(|t| t.key));
        }
        if let Some(targets) = click.workspace_id.and_then(|w| self.by_workspace.get(w)) {
            out.extend(targets.iter().filter(admitted).map(|t| t.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(links: &[&str], workspaces: &[&str], include_bots: bool) -> EndpointConfig {
        let mut e: EndpointConfig = toml::from_str("id = \"x\"\nurl = \"http://x\"").unwrap();
        e.links = links.iter().map(|s| s.to_string()).collect();
        e.workspaces = workspaces.iter().map(|s| s.to_string()).collect();
        e.include_bots = include_bots;
        e
    }

    fn route(index: &RoutingIndex, link: &str, ws: Option<&str>, bot: bool) -> Vec<EndpointKey> {
        let mut out = vec![];
        index.route(
            ClickFacts {
                link_id: link,
                workspace_id: ws,
                is_bot: bot,
            },
            &mut out,
        );
        out.sort();
        out
    }

    #[test]
    fn link_and_workspace_endpoints_both_fire() {
        let eps = [
            ep(&["12345"], &[], false),
            ep(&[], &["1"], false),
            ep(&[], &[], false),
            ep(&["9"], &[], false),
        ];
        let index = RoutingIndex::build(eps.iter().enumerate().map(|(i, e)| (i as u32, e)));
        assert_eq!(route(&index, "12345", Some("1"), false), vec![0, 1, 2]);
        assert_eq!(route(&index, "777", Some("2"), false), vec![2]);
    }

    #[test]
    fn both_filters_must_hold() {
        let eps = [ep(&["a"], &["w1"], false)];
        let index = RoutingIndex::build(eps.iter().map(|e| (7, e)));
        assert_eq!(route(&index, "a", Some("w1"), false), vec![7]);
        assert!(route(&index, "a", Some("w2"), false).is_empty());
        assert!(route(&index, "a", None, false).is_empty());
    }

    #[test]
    fn bots_reach_only_endpoints_that_include_them() {
        let eps = [ep(&[], &[], false), ep(&[], &[], true)];
        let index = RoutingIndex::build(eps.iter().enumerate().map(|(i, e)| (i as u32, e)));
        assert_eq!(route(&index, "l", None, true), vec![1]);
        assert_eq!(route(&index, "l", None, false), vec![0, 1]);
    }

    #[test]
    fn disabled_endpoints_get_nothing() {
        let mut e = ep(&[], &[], false);
        e.enabled = false;
        let index = RoutingIndex::build([(1, &e)]);
        assert!(route(&index, "l", None, false).is_empty());
    }

    #[test]
    fn duplicate_links_in_one_endpoint_match_once() {
        let eps = [ep(&["a", "a"], &[], false)];
        let index = RoutingIndex::build(eps.iter().map(|e| (3, e)));
        assert_eq!(route(&index, "a", None, false), vec![3]);
    }
}
