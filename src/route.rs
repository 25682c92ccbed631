//! Routing: which endpoints want a click. It owns the [`RoutingIndex`], built from the
//! enabled endpoints, that maps link ids and workspace ids to endpoint keys so matching
//! costs O(matched endpoints), not O(all endpoints). It must not do I/O or hold endpoint
//! state beyond filters: a new index is swapped in whenever endpoints change. Its maps
//! are persistent (structurally shared), so the index with one endpoint more is a cheap
//! copy of the current one plus that endpoint, not a rebuild over all of them.

use crate::config::EndpointConfig;
use crate::log::EndpointKey;
use std::collections::HashSet;
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

/// Targets under one link or workspace id; shared between index versions.
type Targets = Arc<Vec<Target>>;

/// Ids to targets.
type TargetMap = imbl::HashMap<String, Targets>;

#[derive(Debug, Default, Clone)]
pub struct RoutingIndex {
    by_link: TargetMap,
    by_workspace: TargetMap,
    everyone: imbl::Vector<Target>,
}

/// Adds `target` under `id`, copying only that id's list.
fn push(map: &mut TargetMap, id: &str, target: Target) {
    let mut list = map.get(id).map(|l| Vec::clone(l)).unwrap_or_default();
    list.push(target);
    map.insert(id.to_string(), Arc::new(list));
}

/// Takes `key`'s targets out from under `id`, copying only that id's list.
fn pull(map: &mut TargetMap, id: &str, key: EndpointKey) {
    let Some(list) = map.get(id) else { return };
    let kept: Vec<Target> = list.iter().filter(|t| t.key != key).cloned().collect();
    if kept.is_empty() {
        map.remove(id);
    } else if kept.len() < list.len() {
        map.insert(id.to_string(), Arc::new(kept));
    }
}

impl RoutingIndex {
    /// Indexes the given endpoints; disabled ones are left out.
    pub fn build<'a>(endpoints: impl IntoIterator<Item = (EndpointKey, &'a EndpointConfig)>) -> Self {
        let mut index = RoutingIndex::default();
        for (key, ep) in endpoints {
            index.add(key, ep);
        }
        index
    }

    /// Indexes one more endpoint; a disabled one is left out.
    pub fn add(&mut self, key: EndpointKey, ep: &EndpointConfig) {
        if !ep.enabled {
            return;
        }
        let workspaces: HashSet<String> = ep.workspaces.iter().cloned().collect();
        let target = |workspaces| Target {
            key,
            include_bots: ep.include_bots,
            workspaces,
        };
        if !ep.links.is_empty() {
            let filter = (!workspaces.is_empty()).then(|| Arc::new(workspaces));
            let links: HashSet<&String> = ep.links.iter().collect();
            for link in links {
                push(&mut self.by_link, link, target(filter.clone()));
            }
        } else if !workspaces.is_empty() {
            for ws in &workspaces {
                push(&mut self.by_workspace, ws, target(None));
            }
        } else {
            self.everyone.push_back(target(None));
        }
    }

    /// Takes out an endpoint added with this same config.
    pub fn remove(&mut self, key: EndpointKey, ep: &EndpointConfig) {
        if !ep.enabled {
            return;
        }
        if !ep.links.is_empty() {
            for link in &ep.links {
                pull(&mut self.by_link, link, key);
            }
        } else if !ep.workspaces.is_empty() {
            for ws in &ep.workspaces {
                pull(&mut self.by_workspace, ws, key);
            }
        } else {
            self.everyone.retain(|t| t.key != key);
        }
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

    /// The registry adds an endpoint to a copy of the live index while clicks are routed
    /// through the original: the copy must route as a full rebuild would, and the
    /// original must not see the new endpoint.
    #[test]
    fn an_index_grown_one_endpoint_at_a_time_routes_as_one_built_at_once_and_copies_stay_apart() {
        let mut off = ep(&["1"], &[], true);
        off.enabled = false;
        let eps = [
            ep(&["1"], &[], true),
            ep(&["1", "2"], &["w"], false),
            ep(&[], &["w"], true),
            off,
            ep(&[], &[], false),
            ep(&["2"], &[], true),
        ];
        let whole = RoutingIndex::build(eps.iter().enumerate().map(|(i, e)| (i as u32, e)));
        let mut grown = RoutingIndex::default();
        let mut copies = Vec::new();
        for (i, e) in eps.iter().enumerate() {
            copies.push(grown.clone());
            grown.add(i as u32, e);
        }
        let clicks = [
            ("1", Some("w"), false),
            ("1", None, true),
            ("2", Some("w"), true),
            ("2", None, false),
            ("3", Some("w"), false),
            ("3", None, true),
        ];
        for (link, ws, bot) in clicks {
            let mut want = route(&whole, link, ws, bot);
            let mut got = route(&grown, link, ws, bot);
            want.sort();
            got.sort();
            assert_eq!(got, want, "{link} {ws:?} {bot}");
            for (n, copy) in copies.iter().enumerate() {
                let seen = route(copy, link, ws, bot);
                assert!(
                    seen.iter().all(|k| (*k as usize) < n),
                    "copy {n} saw a later endpoint: {seen:?}"
                );
            }
        }
        assert_eq!(
            route(&grown, "1", Some("w"), false),
            vec![0, 1, 2, 4],
            "every matching endpoint, once"
        );
    }

    #[test]
    fn removing_an_endpoint_routes_as_a_rebuild_without_it() {
        let eps = [
            ep(&["1"], &[], true),
            ep(&["1", "2", "1"], &["w"], false),
            ep(&[], &["w", "v"], true),
            ep(&[], &[], false),
            ep(&[], &[], true),
        ];
        let mut index = RoutingIndex::build(eps.iter().enumerate().map(|(i, e)| (i as u32, e)));
        let before = index.clone();
        for gone in [1, 2, 3] {
            index.remove(gone as u32, &eps[gone]);
        }
        let rest = RoutingIndex::build([(0, &eps[0]), (4, &eps[4])]);
        for (link, ws, bot) in [("1", Some("w"), false), ("2", Some("v"), true), ("3", None, false)] {
            assert_eq!(
                route(&index, link, ws, bot),
                route(&rest, link, ws, bot),
                "{link} {ws:?} {bot}"
            );
        }
        assert_eq!(
            route(&before, "1", Some("w"), false),
            vec![0, 1, 2, 3, 4],
            "the copy kept them"
        );
        assert!(
            index.by_link.get("2").is_none() && index.by_workspace.is_empty(),
            "no empty lists stay"
        );
    }
}
