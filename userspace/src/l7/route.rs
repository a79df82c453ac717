//! Which instance a request goes to, decided whole here from the request's
//! head (its key: header, cookie, path segment or query parameter; the
//! priority rule it matches) and what [`Instances`] says of the service's
//! instances now (the owner array, which are available, their load). The
//! answer is the request's [`Candidates`] in the order to try them, so a
//! retry is the next one.

use hyper::{
    HeaderMap, Uri,
    header::{COOKIE, HeaderValue},
};
use sluice_common::{key, unit_of};

use crate::config::{HttpConfig, PriorityRule, RequestKey, RequestMatch};

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
}

/// The value of query parameter `name` as sent (not percent-decoded:
/// clients must spell a key the same way each time).
fn query<'u>(uri: &'u Uri, name: &str) -> Option<&'u [u8]> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}

/// Segment `n` (from 1) of the path: `/users/alice/cart`, 2 -> `alice`.
fn path_segment(uri: &Uri, n: u32) -> Option<&[u8]> {
    uri.path()
        .split('/')
        .filter(|s| !s.is_empty())
        .nth(usize::try_from(n).ok()?.checked_sub(1)?)
        .map(str::as_bytes)
}

/// The request's key as configured, if it carries one (an empty value
/// counts as missing).
#[must_use]
pub fn request_key<'r>(key: &RequestKey, uri: &'r Uri, headers: &'r HeaderMap) -> Option<&'r [u8]> {
    match key {
        RequestKey::Header(name) => headers.get(name.as_str()).map(HeaderValue::as_bytes),
        RequestKey::Cookie(name) => cookie(headers, name),
        RequestKey::PathSegment(n) => path_segment(uri, *n),
        RequestKey::Query(name) => query(uri, name),
    }
    .filter(|v| !v.is_empty())
}

/// Whether a request matches `m`.
#[must_use]
pub fn matches(m: &RequestMatch, uri: &Uri, headers: &HeaderMap) -> bool {
    match m {
        RequestMatch::Header { name, value } => headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes()),
        RequestMatch::Cookie { name, value } => cookie(headers, name) == Some(value.as_bytes()),
        RequestMatch::PathPrefix(p) => uri.path().starts_with(p.as_str()),
    }
}

/// The first priority rule the request matches.
#[must_use]
pub fn priority(rules: &[PriorityRule], uri: &Uri, headers: &HeaderMap) -> Option<usize> {
    rules.iter().position(|r| matches(&r.when, uri, headers))
}

/// How loaded an instance is, as its distributor sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    pub in_flight: u64,
    /// Smoothed response latency (head), milliseconds.
    pub latency_ms: f64,
}

impl Load {
    /// Expected wait of one more request: latency times the requests
    /// ahead of it (+1 for itself). A slow instance with nothing in flight
    /// still ranks behind a fast one with a little.
    #[must_use]
    pub fn cost(self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "in-flight counts are small")]
        let queue = (self.in_flight + 1) as f64;
        self.latency_ms.max(0.001) * queue
    }
}

/// The candidate with the lowest [`Load::cost`]; ties go to the first.
#[must_use]
pub fn least_loaded(candidates: impl IntoIterator<Item = (usize, Load)>) -> Option<usize> {
    candidates
        .into_iter()
        .min_by(|a, b| a.1.cost().total_cmp(&b.1.cost()))
        .map(|(i, _)| i)
}

/// The least-loaded available instance of `set` other than `not`.
fn least_loaded_of(instances: &impl Instances, set: &[usize], not: Option<usize>) -> Option<usize> {
    least_loaded(
        set.iter()
            .copied()
            .filter(|&i| Some(i) != not && instances.available(i))
            .map(|i| (i, instances.load(i))),
    )
}

/// How a request's instance was chosen, as `sluice_http_routed_total{how}`
/// counts them: each request once by key, flow or priority, and once more
/// as [`Routed::Fallback`] if its unit's owner could not take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    /// By the key it carries.
    Key,
    /// By its connection's flow hash (no key configured, or none in it).
    Flow,
    /// To its priority rule's subset.
    Priority,
    /// Elsewhere than its unit's owner (failed, ejected, reserved or on
    /// another host).
    Fallback,
}

impl Routed {
    /// In [`Self::index`] order.
    pub const ALL: [Self; 4] = [Self::Key, Self::Flow, Self::Priority, Self::Fallback];

    /// The metric's `how` label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Flow => "flow",
            Self::Priority => "priority",
            Self::Fallback => "fallback",
        }
    }

    /// Its place in [`Self::ALL`], and so in counters kept in that order.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// What routing reads of a service's instances (indices into its list)
/// when a request arrives.
pub trait Instances {
    /// The instance here that owns `unit` in the owner array; `None` if
    /// its owner is on another host or nobody.
    fn owner(&self, unit: u32) -> Option<usize>;
    /// Whether `i` may be sent a request now (neither failed nor ejected).
    fn available(&self, i: usize) -> bool;
    fn load(&self, i: usize) -> Load;
}

/// A service's instances as routing sets them apart, made once a
/// configuration.
#[derive(Debug)]
pub struct Router {
    /// Each priority rule's instances.
    subsets: Vec<Vec<usize>>,
    /// Instances in no subset: they own the units and take the fallbacks.
    ordinary: Vec<usize>,
    /// Instances in some subset (spill-over targets), ascending.
    reserved: Vec<usize>,
}

impl Router {
    /// `names` are the service's instances, in order; the reserved ones
    /// are those some rule names.
    #[must_use]
    pub fn new(rules: &[PriorityRule], names: &[&str]) -> Self {
        let index = |name: &String| names.iter().position(|n| n == name);
        let subsets = rules
            .iter()
            .map(|r| r.instances.iter().filter_map(index).collect())
            .collect();
        let (reserved, ordinary) = (0..names.len()).partition(|i| {
            rules
                .iter()
                .any(|r| r.instances.iter().any(|n| n == names[*i]))
        });
        Self {
            subsets,
            ordinary,
            reserved,
        }
    }

    /// Where a request with this head, on a connection of flow key `flow`,
    /// goes: a priority rule's request to the least-loaded of its subset;
    /// any other to its unit's owner (by key, else by flow hash) if that
    /// is an available ordinary instance here, else to the least-loaded
    /// available ordinary one (with `spill`, reserved if none is).
    #[must_use]
    pub fn route<'s, I: Instances>(
        &'s self,
        cfg: &HttpConfig,
        instances: &'s I,
        uri: &Uri,
        headers: &HeaderMap,
        flow: u32,
    ) -> Route<'s, I> {
        let candidates = |rule, first| Candidates {
            router: self,
            instances,
            rule,
            spill: cfg.spill,
            next: Next::First(first),
        };
        if let Some(rule) = priority(&cfg.priority, uri, headers) {
            return Route {
                how: Routed::Priority,
                unit: None,
                fell_back: false,
                candidates: candidates(
                    Some(rule),
                    least_loaded_of(instances, &self.subsets[rule], None),
                ),
            };
        }
        let keyed = cfg
            .key
            .as_ref()
            .and_then(|k| request_key(k, uri, headers))
            .map(key::request);
        let unit = unit_of(keyed.unwrap_or(flow));
        let owner = instances
            .owner(unit)
            .filter(|&i| !self.is_reserved(i) && instances.available(i));
        let first = owner.or_else(|| self.fallback(instances, cfg.spill, None));
        Route {
            how: if keyed.is_some() {
                Routed::Key
            } else {
                Routed::Flow
            },
            unit: Some(unit),
            fell_back: owner.is_none(),
            candidates: candidates(None, first),
        }
    }

    fn is_reserved(&self, i: usize) -> bool {
        self.reserved.binary_search(&i).is_ok()
    }

    /// Where a request that matched no rule goes when its owner cannot
    /// take it: the least-loaded ordinary instance, or with `spill` a
    /// reserved one.
    fn fallback(
        &self,
        instances: &impl Instances,
        spill: bool,
        not: Option<usize>,
    ) -> Option<usize> {
        least_loaded_of(instances, &self.ordinary, not).or_else(|| {
            spill
                .then(|| least_loaded_of(instances, &self.reserved, not))
                .flatten()
        })
    }
}

/// Where a request goes, and how that was decided (for the counters).
pub struct Route<'s, I> {
    /// [`Routed::Key`], [`Routed::Flow`] or [`Routed::Priority`].
    pub how: Routed,
    /// The unit its key or flow hash falls in (none for a priority
    /// request).
    pub unit: Option<u32>,
    /// Its unit's owner could not take it.
    pub fell_back: bool,
    pub candidates: Candidates<'s, I>,
}

/// A request's instances in the order to try them: its first choice, then
/// where it goes if that one could not take it, chosen only when asked so
/// that it sees availability and loads as they are then. A request is
/// retried once, so there are at most two.
pub struct Candidates<'s, I> {
    router: &'s Router,
    instances: &'s I,
    /// The priority rule whose subset the retry stays in; none: the
    /// fallback's instances.
    rule: Option<usize>,
    spill: bool,
    next: Next,
}

enum Next {
    First(Option<usize>),
    /// The first choice was this one: the retry is another.
    After(usize),
    Done,
}

impl<I: Instances> Iterator for Candidates<'_, I> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match std::mem::replace(&mut self.next, Next::Done) {
            Next::First(first) => {
                if let Some(i) = first {
                    self.next = Next::After(i);
                }
                first
            }
            Next::After(tried) => {
                let (r, inst) = (self.router, self.instances);
                match self.rule {
                    Some(rule) => least_loaded_of(inst, &r.subsets[rule], Some(tried)),
                    None => r.fallback(inst, self.spill, Some(tried)),
                }
            }
            Next::Done => None,
        }
    }
}

#[cfg(test)]
mod tests;
