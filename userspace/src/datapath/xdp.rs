//! The real data path: loads the XDP program, sizes and writes its maps,
//! attaches it (native, or generic as a fallback), pins it in bpffs so it
//! outlives the agent, adopts what a previous agent pinned, and reads its
//! counters.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMap, HashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        Xdp,
        xdp::{XdpLinkId, XdpMode},
    },
};
use sluice_common::{
    HIT_BUCKETS_PER_SERVICE, MAX_HOST_MACS, counters,
    maps::{
        ClusterEntry, HostEntry, INSTANCE_LIVE, INSTANCE_LOOKUP, INSTANCE_REMOTE, InstanceCounters,
        InstanceEntry, InstanceName, MemberKey, NO_OWNER, OriginKey, PROGRAM_NAME, Pin, PinKey,
        RemoteHost, ServiceCounters, ServiceEntry, ServiceKey, ServiceSlot, Tier, mac_word, names,
        origin_key, origin_prefix_len, previous_entry,
    },
    owner_index,
};

use super::{
    AttachMode, Datapath, DatapathError, GlobalCounters, owners::OwnerTable, service_table,
};
use crate::plan::{Group, Plan};

/// The XDP programs, built by build.rs (or empty stand-ins without
/// bpf-linker).
pub mod objects {
    /// Sluice's XDP program.
    pub static SLUICE_XDP: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-xdp"));
    /// An XDP program that only returns `XDP_PASS` (program `empty`): the
    /// floor benchmarks measure Sluice against.
    pub static EMPTY_XDP: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-empty"));
    /// The end-to-end benchmark's packet generator (`generate`) and sink
    /// (`sink`).
    pub static BENCH_XDP: &[u8] =
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-bench-xdp"));
}

use objects::SLUICE_XDP as OBJECT;

/// Seconds of the clock the XDP program reads (`bpf_ktime_get_coarse_ns`:
/// `CLOCK_MONOTONIC_COARSE`), modulo 2^16 as `PREVIOUS` keeps them.
fn coarse_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u32::try_from(ts.tv_sec & 0xFFFF).expect("masked")
}

/// The owner of every unit, as the data path reads it (see
/// [`XdpDatapath::owner_view`]).
#[derive(Clone)]
pub struct OwnerView(Arc<OwnerTable>);

impl OwnerView {
    #[must_use]
    pub fn owner(&self, service_id: u32, unit: u32) -> u32 {
        self.0.get(owner_index(service_id, unit))
    }
}

/// The loaded program and its maps.
pub struct XdpDatapath {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    /// Shared with [`OwnerView`]s (the L7 distributor reads it too).
    owners: Arc<OwnerTable>,
    /// `PREVIOUS`, mapped like `OWNERS`.
    previous: OwnerTable,
    /// Set when the data path lives on in bpffs across agent restarts.
    pins: Option<Pins>,
    /// (service id, rule index) -> the rule's entry in `TIERS`, as
    /// [`Self::program`] last wrote them.
    tiers: std::collections::HashMap<(u32, u32), u32>,
}

/// A data path pinned under a bpffs directory: every map at `<dir>/<MAP>`,
/// the XDP link at `<dir>/link`, and the interface and attach mode as empty
/// directories `iface=<name>` and `mode=<native|generic>`. While the
/// link is pinned the program stays attached with no agent running; a new
/// agent adopts the maps (owners, counters, pinned flows) and swaps its
/// program in atomically.
struct Pins {
    dir: PathBuf,
    link: Option<aya::programs::links::PinnedLink>,
}

/// The value of a `key=value` directory under `dir`.
fn pin_tag(dir: &Path, key: &str) -> Option<String> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        e.file_name()
            .to_str()?
            .strip_prefix(&format!("{key}="))
            .map(str::to_owned)
    })
}

/// This agent's map layout as the pin directory records it.
fn layout_tag() -> String {
    format!("{:016x}", sluice_common::maps::LAYOUT)
}

/// Refuses pins this agent would misread: a layout other than its own, or
/// a map whose type, key or value size differs from the program's, or
/// whose size differs from what `sizes` (the plan) needs.
fn check_pins(dir: &Path, sizes: &[(&'static str, u32)]) -> Result<(), DatapathError> {
    let pinned: Vec<&'static str> = names::ALL
        .iter()
        .copied()
        .filter(|n| dir.join(n).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(());
    }
    let layout = |problem: String| DatapathError::PinLayout {
        dir: dir.to_owned(),
        problem,
    };
    let ours = layout_tag();
    match pin_tag(dir, "layout") {
        Some(t) if t == ours => {}
        Some(t) => {
            return Err(layout(format!(
                "its map layout is {t}, this agent's is {ours}"
            )));
        }
        None => {
            return Err(layout(
                "it records no map layout (it predates layout checks)".into(),
            ));
        }
    }
    let object = aya_obj::Object::parse(OBJECT)
        .map_err(|e| layout(format!("parsing this agent's own program: {e}")))?;
    for name in pinned {
        let info = aya::maps::MapInfo::from_pin(dir.join(name))
            .map_err(|e| layout(format!("map `{name}` cannot be read: {e}")))?;
        let Some(want) = object.maps.get(name) else {
            return Err(layout(format!(
                "map `{name}` is not in this agent's program"
            )));
        };
        let kind = info.map_type().map_or(u32::MAX, |t| t as u32);
        if (kind, info.key_size(), info.value_size())
            != (want.map_type(), want.key_size(), want.value_size())
        {
            return Err(layout(format!(
                "map `{name}` is of type {kind} with {}-byte keys and {}-byte values, this agent's of type {} with {} and {}",
                info.key_size(),
                info.value_size(),
                want.map_type(),
                want.key_size(),
                want.value_size()
            )));
        }
        let entries = sizes
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(want.max_entries(), |(_, n)| *n);
        if info.max_entries() != entries {
            return Err(DatapathError::PinMismatch {
                dir: dir.to_owned(),
                map: name,
                pinned: info.max_entries(),
                wanted: entries,
            });
        }
    }
    Ok(())
}

/// (id, name) of every id in use in an `INSTANCE_NAMES` map.
fn registry_of<T: std::borrow::Borrow<MapData>>(
    map: &Array<T, InstanceName>,
) -> Result<Vec<(u32, String)>, DatapathError> {
    let mut out = Vec::new();
    for id in 1..map.len() {
        let e = map.get(&id, 0).map_err(map_err(names::INSTANCE_NAMES))?;
        let len = e.name.iter().position(|b| *b == 0).unwrap_or(e.name.len());
        if len > 0 {
            out.push((id, String::from_utf8_lossy(&e.name[..len]).into_owned()));
        }
    }
    Ok(out)
}

/// Sluice's XDP program in a loaded object.
fn program_in(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(DatapathError::Missing {
            what: "program",
            name: PROGRAM_NAME,
        })?
        .try_into()
        .map_err(DatapathError::Program)
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl XdpDatapath {
    /// Loads the program with every map sized for `plan`. Nothing is
    /// attached and no entry written yet.
    pub fn load(plan: &Plan) -> Result<Self, DatapathError> {
        Self::load_with(plan, None)
    }

    /// Sizes of the maps sized for `plan`. The maps indexed by instance id
    /// keep the program's size (`INSTANCE_SLOTS`): ids are stable and may be
    /// sparse, and instances come and go without a resize.
    fn sizes(plan: &Plan) -> [(&'static str, u32); 8] {
        let services = u32::try_from(plan.services.len()).expect("bounded").max(1);
        let keys = plan.services.iter().map(|s| s.keys.len()).sum::<usize>();
        // Rounded up, with a floor, so that a reload adding a rule or a
        // prefix rarely meets pins of another size.
        let rules = u32::try_from(plan.origin_rules().count()).expect("bounded");
        let prefixes = plan
            .origin_rules()
            .map(|(.., r)| r.prefixes.len())
            .sum::<usize>();
        let prefixes = u32::try_from(prefixes).expect("bounded");
        [
            (names::ORIGIN, prefixes.next_power_of_two().max(64)),
            // Two halves: a reload writes its tiers beside the live ones.
            (names::TIERS, 2 * rules.next_power_of_two().max(16)),
            (names::SERVICE_TABLE, 2 * service_table::slots_for(keys)),
            (names::OWNERS, plan.owner_entries()),
            (names::PREVIOUS, plan.owner_entries()),
            (names::SERVICE_COUNTERS, services),
            (names::UNIT_HITS, services * HIT_BUCKETS_PER_SERVICE),
            (names::PINNED, plan.pinned_flows.max(1)),
        ]
    }

    /// Loads as [`Self::load`]; with `pin_dir`, every map is pinned there,
    /// or, if a previous agent left them pinned, adopted (sizes must match).
    pub fn load_with(plan: &Plan, pin_dir: Option<&Path>) -> Result<Self, DatapathError> {
        Self::load_object(plan, pin_dir, OBJECT)
    }

    /// As [`Self::load_with`], with another build of the program: the
    /// benchmark's experiment builds (`cargo xtask bench --experiments`),
    /// which share this one's maps.
    pub fn load_object(
        plan: &Plan,
        pin_dir: Option<&Path>,
        object: &[u8],
    ) -> Result<Self, DatapathError> {
        if object.is_empty() {
            return Err(DatapathError::ObjectMissing);
        }
        let sizes = Self::sizes(plan);
        let mut loader = EbpfLoader::new();
        for (name, n) in sizes {
            loader.map_max_entries(name, n);
        }
        let paths: Vec<(&str, PathBuf)> = pin_dir
            .map(|d| names::ALL.iter().map(|n| (*n, d.join(n))).collect())
            .unwrap_or_default();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                dir: dir.to_owned(),
                source,
            })?;
            check_pins(dir, &sizes)?;
            for (name, path) in &paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(object).map_err(DatapathError::Load)?;
        if let Some(dir) = pin_dir
            && pin_tag(dir, "layout").is_none()
        {
            std::fs::create_dir(dir.join(format!("layout={}", layout_tag()))).map_err(
                |source| DatapathError::PinDir {
                    dir: dir.to_owned(),
                    source,
                },
            )?;
        }
        program_in(&mut ebpf)?
            .load()
            .map_err(DatapathError::Program)?;
        let table = |name: &'static str| match ebpf.map(name) {
            Some(aya::maps::Map::Array(data)) => OwnerTable::map(data, plan.owner_entries()),
            _ => Err(DatapathError::Missing {
                what: "array map",
                name,
            }),
        };
        let owners = Arc::new(table(names::OWNERS)?);
        let previous = table(names::PREVIOUS)?;
        Ok(Self {
            ebpf,
            link: None,
            owners,
            previous,
            pins: pin_dir.map(|d| Pins {
                dir: d.to_owned(),
                link: None,
            }),
            tiers: std::collections::HashMap::new(),
        })
    }

    /// The id registry of the data path pinned in `pin_dir`: (id, name) of
    /// every id in use; empty when nothing is pinned there.
    pub fn registered_instances(pin_dir: &Path) -> Result<Vec<(u32, String)>, DatapathError> {
        let path = pin_dir.join(names::INSTANCE_NAMES);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let data = MapData::from_pin(&path).map_err(map_err(names::INSTANCE_NAMES))?;
        let map: Array<MapData, InstanceName> =
            Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(names::INSTANCE_NAMES))?;
        registry_of(&map)
    }

    /// This data path's id registry: (id, name) of every id in use.
    pub fn registered(&self) -> Result<Vec<(u32, String)>, DatapathError> {
        let map: Array<&MapData, InstanceName> = self.map(names::INSTANCE_NAMES)?;
        registry_of(&map)
    }

    /// The owner of every unit of services `0..services` in the data path
    /// pinned in `pin_dir` (a row per service; rows the pinned array does
    /// not have are missing); empty when nothing is pinned there.
    pub fn pinned_owners(pin_dir: &Path, services: u32) -> Result<Vec<Vec<u32>>, DatapathError> {
        let path = pin_dir.join(names::OWNERS);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let data = MapData::from_pin(&path).map_err(map_err(names::OWNERS))?;
        let entries = data.info().map_err(map_err(names::OWNERS))?.max_entries();
        let table = OwnerTable::map(&data, entries)?;
        Ok((0..services)
            .take_while(|s| owner_index(*s + 1, 0) <= entries)
            .map(|s| {
                (0..sluice_common::UNITS_PER_SERVICE)
                    .map(|u| table.get(owner_index(s, u)))
                    .collect()
            })
            .collect())
    }

    /// The instance maps and the id registry, for `plan` (see
    /// [`Self::program`]).
    fn program_instances(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        let registered = self.registered()?;
        let held_by = |id: u32, name: &str| registered.iter().any(|(r, n)| *r == id && n == name);
        let retired: Vec<u32> = registered
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !plan.instances.iter().any(|i| i.id == *id))
            .collect();
        let newcomers: Vec<u32> = plan
            .instances
            .iter()
            .filter(|i| !held_by(i.id, &i.name))
            .map(|i| i.id)
            .collect();
        {
            let mut counters: PerCpuArray<&mut MapData, InstanceCounters> =
                self.map_mut(names::INSTANCE_COUNTERS)?;
            let syscall = |call, io_error| DatapathError::Map {
                name: names::INSTANCE_COUNTERS,
                source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
            };
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| syscall("nr_cpus", e))?;
            for id in &newcomers {
                let zero =
                    aya::maps::PerCpuValues::try_from(vec![InstanceCounters::default(); cpus])
                        .map_err(|e| syscall("zeroing per-CPU values", e))?;
                counters
                    .set(*id, zero, 0)
                    .map_err(map_err(names::INSTANCE_COUNTERS))?;
            }
        }
        {
            let mut instances: Array<&mut MapData, InstanceEntry> =
                self.map_mut(names::INSTANCES)?;
            for i in &plan.instances {
                let old = instances.get(&i.id, 0).map_err(map_err(names::INSTANCES))?;
                let generation = if newcomers.contains(&i.id) {
                    old.generation.wrapping_add(1)
                } else {
                    old.generation
                };
                let entry = InstanceEntry {
                    mac: i.mac,
                    generation,
                    flags: if i.live { INSTANCE_LIVE } else { 0 }
                        | if i.netns_id.is_some() {
                            INSTANCE_LOOKUP
                        } else {
                            0
                        },
                    service_id: i.service_id,
                    host: 0,
                    netns_id: i.netns_id.unwrap_or(u32::MAX),
                };
                instances
                    .set(i.id, entry, 0)
                    .map_err(map_err(names::INSTANCES))?;
            }
        }
        // Out of the data path; the generation stays, for the next holder.
        for id in &retired {
            self.update_instance(*id, |e| e.flags = 0)?;
        }
        // A failed instance's veth may be gone: it is pointed at its new
        // one when it recovers.
        for i in plan.instances.iter().filter(|i| i.live) {
            self.set_deliver(i.id, i.ifindex)?;
        }
        {
            let mut registry: Array<&mut MapData, InstanceName> =
                self.map_mut(names::INSTANCE_NAMES)?;
            for i in &plan.instances {
                let mut entry = InstanceName::default();
                entry.name[..i.name.len()].copy_from_slice(i.name.as_bytes());
                registry
                    .set(i.id, entry, 0)
                    .map_err(map_err(names::INSTANCE_NAMES))?;
            }
            for id in &retired {
                registry
                    .set(*id, InstanceName::default(), 0)
                    .map_err(map_err(names::INSTANCE_NAMES))?;
            }
        }
        Ok(())
    }

    /// Writes the whole plan: instances and their veths first, then owners,
    /// and the services last, so no packet matches a service whose owners
    /// are not in place yet.
    ///
    /// Ids come from the registry ([`crate::plan::ids`]): an id now held by
    /// another name than before gets a new generation, so the pins its
    /// previous instance left do not hold, and its counters start from
    /// zero; ids no longer configured are taken out of the data path.
    pub fn program(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        self.program_instances(plan)?;
        for s in &plan.services {
            for (g, owner) in &s.groups {
                self.set_group_owner(s.id, *g, *owner)?;
            }
        }
        self.set_origins(plan)?;
        self.set_services(plan)?;
        self.set_host_macs(&plan.host_macs)
    }

    /// Writes the plan's origin rules: their tiers into the half of `TIERS`
    /// the live `ORIGIN` entries do not point into, then the `ORIGIN`
    /// entries (each one update: a packet sees a rule's old tier or its
    /// new one), then takes out the entries of prefixes no longer
    /// configured. A failure half-way leaves the live tiers untouched; a
    /// roll-back programs the running plan again.
    fn set_origins(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        let live: Vec<(LpmKey<OriginKey>, u32)> = {
            let trie: LpmTrie<&MapData, OriginKey, u32> = self.map(names::ORIGIN)?;
            trie.iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(names::ORIGIN))?
        };
        let half_len = {
            let tiers: Array<&MapData, Tier> = self.map(names::TIERS)?;
            tiers.len() / 2
        };
        let half = live.first().map_or(0, |(_, t)| (t / half_len + 1) & 1);
        let mut tiers = std::collections::HashMap::new();
        {
            let mut map: Array<&mut MapData, Tier> = self.map_mut(names::TIERS)?;
            for (at, (service, rule, r)) in (0..).zip(plan.origin_rules()) {
                let t = half * half_len + at;
                let tier = r.tier(|id| plan.instance(id).is_some_and(|i| i.live));
                map.set(t, tier, 0).map_err(map_err(names::TIERS))?;
                tiers.insert((service, rule), t);
            }
        }
        let mut wanted = Vec::new();
        for (service, rule, r) in plan.origin_rules() {
            for &(addr, len) in &r.prefixes {
                let (words, family) = crate::plan::addr_words(addr);
                let key = LpmKey::new(
                    origin_prefix_len(family, u32::from(len)),
                    origin_key(service, family, words),
                );
                wanted.push((key, tiers[&(service, rule)]));
            }
        }
        let mut trie: LpmTrie<&mut MapData, OriginKey, u32> = self.map_mut(names::ORIGIN)?;
        for (key, t) in &wanted {
            trie.insert(key, t, 0).map_err(map_err(names::ORIGIN))?;
        }
        let same = |a: &LpmKey<OriginKey>, b: &LpmKey<OriginKey>| {
            a.prefix_len() == b.prefix_len() && a.data() == b.data()
        };
        for (key, _) in &live {
            if !wanted.iter().any(|(w, _)| same(w, key)) {
                trie.remove(key).map_err(map_err(names::ORIGIN))?;
            }
        }
        self.tiers = tiers;
        Ok(())
    }

    /// Writes the plan's services into the half of the service table the
    /// data path does not read, then makes that half the live one.
    fn set_services(&mut self, plan: &Plan) -> Result<(), DatapathError> {
        let services: Vec<(ServiceKey, ServiceEntry)> = plan
            .services
            .iter()
            .flat_map(|s| s.keys.iter().map(|k| (*k, s.entry)))
            .collect();
        let mut host = self.host_entry()?;
        let table: Array<&MapData, ServiceSlot> = self.map(names::SERVICE_TABLE)?;
        let slots = table.len() / 2;
        let layout = service_table::place(&services, slots)?;
        let half = if host.service_mask + 1 == slots {
            (host.service_half + 1) & 1
        } else {
            // Fresh maps: both halves are empty, either will do.
            0
        };
        let mut table: Array<&mut MapData, ServiceSlot> = self.map_mut(names::SERVICE_TABLE)?;
        for (i, slot) in (0..).zip(layout) {
            table
                .set(half * slots + i, slot, 0)
                .map_err(map_err(names::SERVICE_TABLE))?;
        }
        host.service_mask = slots - 1;
        host.service_half = half;
        let mut map: Array<&mut MapData, HostEntry> = self.map_mut(names::HOST)?;
        map.set(0, host, 0).map_err(map_err(names::HOST))
    }

    fn host_entry(&self) -> Result<HostEntry, DatapathError> {
        let map: Array<&MapData, HostEntry> = self.map(names::HOST)?;
        map.get(&0, 0).map_err(map_err(names::HOST))
    }

    /// Rewrites entry `id` of the `INSTANCES` map with `f`.
    fn update_instance(
        &mut self,
        id: u32,
        f: impl FnOnce(&mut InstanceEntry),
    ) -> Result<(), DatapathError> {
        let mut instances: Array<&mut MapData, InstanceEntry> = self.map_mut(names::INSTANCES)?;
        let mut e = instances.get(&id, 0).map_err(map_err(names::INSTANCES))?;
        f(&mut e);
        instances.set(id, e, 0).map_err(map_err(names::INSTANCES))
    }

    /// Points id `id` of the `DELIVER` map at interface `ifindex`.
    fn set_deliver(&mut self, id: u32, ifindex: u32) -> Result<(), DatapathError> {
        let mut deliver: DevMap<&mut MapData> = self.map_mut(names::DELIVER)?;
        deliver.set(id, ifindex, None, 0).map_err(|e| match e {
            aya::maps::xdp::XdpMapError::MapError(source) => DatapathError::Map {
                name: names::DELIVER,
                source,
            },
            aya::maps::xdp::XdpMapError::ChainedProgramNotSupported => {
                unreachable!("no chained program is given")
            }
        })
    }

    /// The MACs frames must be addressed to for the program to steer them.
    pub fn set_host_macs(&mut self, macs: &[[u8; 6]]) -> Result<(), DatapathError> {
        let mut entry = self.host_entry()?;
        entry.macs = [0; MAX_HOST_MACS];
        for (slot, mac) in entry.macs.iter_mut().zip(macs.iter().take(MAX_HOST_MACS)) {
            *slot = mac_word(*mac);
        }
        let mut host: Array<&mut MapData, HostEntry> = self.map_mut(names::HOST)?;
        host.set(0, entry, 0).map_err(map_err(names::HOST))
    }

    /// This host's place in its cluster: where encapsulated packets leave
    /// from and arrive at (all zero: no cluster).
    pub fn set_cluster(&mut self, entry: ClusterEntry) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, ClusterEntry> = self.map_mut(names::CLUSTER)?;
        map.set(0, entry, 0).map_err(map_err(names::CLUSTER))
    }

    /// Another host of the cluster, at `index` (`1..=MAX_HOSTS`).
    pub fn set_remote_host(&mut self, index: u32, host: RemoteHost) -> Result<(), DatapathError> {
        let mut map: Array<&mut MapData, RemoteHost> = self.map_mut(names::REMOTE_HOSTS)?;
        map.set(index, host, 0)
            .map_err(map_err(names::REMOTE_HOSTS))
    }

    /// The underlay addresses encapsulated packets are taken from: exactly
    /// `members` from now on.
    pub fn set_members(&mut self, members: &[MemberKey]) -> Result<(), DatapathError> {
        let mut map: HashMap<&mut MapData, MemberKey, u32> = self.map_mut(names::MEMBERS)?;
        let stale: Vec<MemberKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !members.contains(k))
            .collect();
        for k in &stale {
            map.remove(k).map_err(map_err(names::MEMBERS))?;
        }
        for (i, k) in (1..).zip(members) {
            map.insert(k, i, 0).map_err(map_err(names::MEMBERS))?;
        }
        Ok(())
    }

    /// Where instance `id`'s sockets are looked up for the second chance:
    /// the id of its network namespace relative to the NIC's (`u32::MAX`:
    /// the NIC's own); `None`: nowhere.
    pub fn set_instance_netns(
        &mut self,
        id: u32,
        netns_id: Option<u32>,
    ) -> Result<(), DatapathError> {
        self.update_instance(id, |e| {
            e.netns_id = netns_id.unwrap_or(u32::MAX);
            if netns_id.is_some() {
                e.flags |= INSTANCE_LOOKUP;
            } else {
                e.flags &= !INSTANCE_LOOKUP;
            }
        })
    }

    /// Instance `id` of service `service_id` runs on remote host `host`
    /// (an index of [`Self::set_remote_host`]): its packets are
    /// encapsulated and sent there while `live`.
    pub fn set_remote_instance(
        &mut self,
        id: u32,
        service_id: u32,
        host: u32,
        live: bool,
    ) -> Result<(), DatapathError> {
        self.update_instance(id, |e| {
            e.service_id = service_id;
            e.host = host;
            e.mac = [0; 6];
            e.flags = INSTANCE_REMOTE | if live { INSTANCE_LIVE } else { 0 };
        })
    }

    /// Attaches to `iface`: native XDP, or generic mode when the driver
    /// refuses (with a warning, since generic mode is much slower).
    pub fn attach(
        &mut self,
        iface: &str,
        force_generic: bool,
    ) -> Result<AttachMode, DatapathError> {
        if let Some(dir) = self.pins.as_ref().map(|p| p.dir.clone())
            && dir.join("link").exists()
        {
            return self.adopt(&dir, iface);
        }
        let mode = self.attach_fresh(iface, force_generic)?;
        if let Some(dir) = self.pins.as_ref().map(|p| p.dir.clone()) {
            self.pin_link(&dir, iface, mode)?;
        }
        Ok(mode)
    }

    /// Refuses, before anything is written, a pinned link on another
    /// interface than `iface`.
    pub fn check_adoptable(&self, iface: &str) -> Result<(), DatapathError> {
        let Some(dir) = self.pins.as_ref().map(|p| &p.dir) else {
            return Ok(());
        };
        if !dir.join("link").exists() {
            return Ok(());
        }
        let pinned_iface = pin_tag(dir, "iface").unwrap_or_default();
        if pinned_iface != iface {
            return Err(DatapathError::Adopt {
                dir: dir.clone(),
                problem: format!("it holds a link on `{pinned_iface}`, not `{iface}`"),
            });
        }
        Ok(())
    }

    /// Takes over the link a previous agent pinned, swapping this program in
    /// (one `bpf_link_update`: no packet sees no program).
    fn adopt(&mut self, dir: &Path, iface: &str) -> Result<AttachMode, DatapathError> {
        let pin_err = |what: &str| DatapathError::Adopt {
            dir: dir.to_owned(),
            problem: what.to_owned(),
        };
        self.check_adoptable(iface)?;
        let mode = match pin_tag(dir, "mode").as_deref() {
            Some("generic") => AttachMode::Generic,
            _ => AttachMode::Native,
        };
        // Swap the program in through the pinned link without unpinning it
        // first: if the update fails, the link and the running program stay
        // as they were.
        let pinned = aya::programs::links::PinnedLink::from_pin(dir.join("link"))
            .map_err(|e| pin_err(&format!("reading the pinned link: {e}")))?;
        let xdp_link =
            aya::programs::xdp::XdpLink::try_from(aya::programs::links::FdLink::from(pinned))
                .map_err(|e| pin_err(&format!("the pinned link is not an XDP link: {e}")))?;
        let id = self
            .program_mut()?
            .attach_to_link(xdp_link)
            .map_err(DatapathError::Program)?;
        // The pin holds the link from now on; this fd is not needed.
        drop(
            self.program_mut()?
                .take_link(id)
                .map_err(DatapathError::Program)?,
        );
        let link = aya::programs::links::PinnedLink::from_pin(dir.join("link"))
            .map_err(|e| pin_err(&format!("reading the pinned link: {e}")))?;
        if let Some(p) = &mut self.pins {
            p.link = Some(link);
        }
        Ok(mode)
    }

    /// Pins the link, so the program stays attached when this agent exits.
    fn pin_link(&mut self, dir: &Path, iface: &str, mode: AttachMode) -> Result<(), DatapathError> {
        let Some(id) = self.link.take() else {
            return Ok(());
        };
        let xdp_link = self
            .program_mut()?
            .take_link(id)
            .map_err(DatapathError::Program)?;
        let fd_link = match aya::programs::links::FdLink::try_from(xdp_link) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "this kernel attached XDP without a bpf link: hot restart is unavailable");
                return Ok(());
            }
        };
        let pinned = fd_link
            .pin(dir.join("link"))
            .map_err(|e| DatapathError::Adopt {
                dir: dir.to_owned(),
                problem: format!("pinning the link: {e}"),
            })?;
        let io = |source| DatapathError::PinDir {
            dir: dir.to_owned(),
            source,
        };
        // bpffs holds only pinned objects and directories: the facts the
        // next agent needs are directory names.
        for (key, value) in [("iface", iface), ("mode", mode.name())] {
            if pin_tag(dir, key).is_none() {
                std::fs::create_dir(dir.join(format!("{key}={value}"))).map_err(io)?;
            }
        }
        if let Some(p) = &mut self.pins {
            p.link = Some(pinned);
        }
        Ok(())
    }

    fn attach_fresh(
        &mut self,
        iface: &str,
        force_generic: bool,
    ) -> Result<AttachMode, DatapathError> {
        let prog = self.program_mut()?;
        let native_err = if force_generic {
            None
        } else {
            match prog.attach(iface, XdpMode::Driver) {
                Ok(link) => {
                    self.link = Some(link);
                    return Ok(AttachMode::Native);
                }
                Err(e) => Some(e),
            }
        };
        match prog.attach(iface, XdpMode::Skb) {
            Ok(link) => {
                if let Some(e) = native_err {
                    tracing::warn!(iface, error = %e, "native XDP refused; attached in generic (skb) mode, which is much slower");
                }
                self.link = Some(link);
                Ok(AttachMode::Generic)
            }
            Err(source) => Err(DatapathError::Attach {
                iface: iface.to_owned(),
                source: native_err.unwrap_or(source),
            }),
        }
    }

    /// Registers the agent's `AF_XDP` socket `fd` for receive queue `queue`:
    /// from now on, packets of unowned units on that queue are punted to it.
    pub fn set_punt_socket(
        &mut self,
        queue: u32,
        fd: std::os::fd::RawFd,
    ) -> Result<(), DatapathError> {
        let mut map: aya::maps::XskMap<&mut MapData> = self.map_mut(names::PUNT)?;
        map.set(queue, fd, 0).map_err(map_err(names::PUNT))
    }

    /// A read-only handle on the owner array, for readers outside the
    /// control loop (the L7 distributor, on its own threads).
    #[must_use]
    pub fn owner_view(&self) -> OwnerView {
        OwnerView(self.owners.clone())
    }

    /// Whether the data path is pinned (it outlives this agent).
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.link.is_some())
    }

    /// As [`Self::remove_pins`], for a data path no agent runs: refused,
    /// touching nothing, while an agent holds `dir` (`sluice detach`).
    pub fn remove_unattended_pins(dir: &Path) -> Result<bool, DatapathError> {
        let _lock = crate::sys::lock::lock_pin_dir(dir)?;
        Self::remove_pins(dir)
    }

    /// Removes everything pinned under `dir`: the link (the program is
    /// detached when no one else holds it) and every map.
    pub fn remove_pins(dir: &Path) -> Result<bool, DatapathError> {
        if !dir.exists() {
            return Ok(false);
        }
        if dir.join("link").exists()
            && let Ok(l) = aya::programs::links::PinnedLink::from_pin(dir.join("link"))
        {
            drop(l.unpin());
        }
        for f in names::ALL.iter().copied().chain(["link"]) {
            let _ = std::fs::remove_file(dir.join(f));
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().contains('=') {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        std::fs::remove_dir(dir).map_err(|source| DatapathError::PinDir {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(true)
    }

    /// Detaches from the interface (dropping the dataplane does it too).
    /// A pinned data path is left attached for the next agent; use
    /// [`Self::remove_pins`] to take it down.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        if let Some(link) = self.link.take() {
            self.program_mut()?
                .detach(link)
                .map_err(DatapathError::Program)?;
        }
        Ok(())
    }

    /// The loaded object, for tools and benchmarks that need a map or
    /// program this type does not wrap.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// As [`Self::ebpf_mut`], shared.
    #[must_use]
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program_ref(&self) -> Result<&Xdp, DatapathError> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or(DatapathError::Missing {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(DatapathError::Program)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        program_in(&mut self.ebpf)
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { what: "map", name })?
            .try_into()
            .map_err(map_err(name))
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        self.ebpf
            .map(name)
            .ok_or(DatapathError::Missing { what: "map", name })?
            .try_into()
            .map_err(map_err(name))
    }

    /// The `TIERS` entry of origin rule `rule` of service `service_id`.
    fn tier_index(&self, service_id: u32, rule: u32) -> Result<u32, DatapathError> {
        self.tiers
            .get(&(service_id, rule))
            .copied()
            .ok_or(DatapathError::UnknownTier { service_id, rule })
    }

    /// Entry `id` of per-CPU map `name`, summed over CPUs.
    fn per_cpu_sum<T>(&self, name: &'static str, id: u32) -> Result<T, DatapathError>
    where
        T: aya::Pod + Default + std::ops::AddAssign,
    {
        let map: PerCpuArray<&MapData, T> = self.map(name)?;
        let mut sum = T::default();
        for c in map.get(&id, 0).map_err(map_err(name))?.iter() {
            sum += *c;
        }
        Ok(sum)
    }
}

impl Datapath for XdpDatapath {
    fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DatapathError> {
        // Plain stores into the mapped arrays: no syscall a unit. A unit
        // that changes hands remembers its previous owner, for the second
        // chance of the connections still there.
        let t = std::time::Instant::now();
        let moved_at = coarse_secs();
        for unit in group.units() {
            let i = owner_index(service_id, unit);
            let old = self.owners.get(i);
            if old != owner && old != NO_OWNER {
                self.previous.set(i, previous_entry(old, moved_at));
            }
            self.owners.set(i, owner);
        }
        crate::telemetry::map_write(t.elapsed().as_secs_f64());
        Ok(())
    }

    fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32 {
        self.owners.get(owner_index(service_id, unit))
    }

    fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DatapathError> {
        self.update_instance(id, |e| {
            if live {
                e.flags |= INSTANCE_LIVE;
            } else {
                e.flags &= !INSTANCE_LIVE;
            }
        })
    }

    fn set_instance_target(
        &mut self,
        id: u32,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), DatapathError> {
        self.set_deliver(id, ifindex)?;
        self.update_instance(id, |e| e.mac = mac)
    }

    fn global_counters(&self) -> Result<GlobalCounters, DatapathError> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::GLOBAL_COUNTERS)?;
        let mut out = [0u64; counters::COUNT as usize];
        for (i, slot) in (0u32..).zip(out.iter_mut()) {
            *slot = map
                .get(&i, 0)
                .map_err(map_err(names::GLOBAL_COUNTERS))?
                .iter()
                .sum();
        }
        // The data path counts a delivered packet in its service only.
        let services: PerCpuArray<&MapData, ServiceCounters> = self.map(names::SERVICE_COUNTERS)?;
        for id in 0..services.len() {
            out[counters::DELIVERED as usize] += self.service_counters(id)?.delivered;
        }
        Ok(out)
    }

    fn service_counters(&self, id: u32) -> Result<ServiceCounters, DatapathError> {
        self.per_cpu_sum(names::SERVICE_COUNTERS, id)
    }

    fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DatapathError> {
        self.per_cpu_sum(names::INSTANCE_COUNTERS, id)
    }

    fn tier(&self, service_id: u32, rule: u32) -> Result<Tier, DatapathError> {
        let t = self.tier_index(service_id, rule)?;
        let map: Array<&MapData, Tier> = self.map(names::TIERS)?;
        map.get(&t, 0).map_err(map_err(names::TIERS))
    }

    fn set_tier(&mut self, service_id: u32, rule: u32, tier: &Tier) -> Result<(), DatapathError> {
        let t = self.tier_index(service_id, rule)?;
        let mut map: Array<&mut MapData, Tier> = self.map_mut(names::TIERS)?;
        map.set(t, tier, 0).map_err(map_err(names::TIERS))
    }

    fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DatapathError> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::UNIT_HITS)?;
        (0..HIT_BUCKETS_PER_SERVICE)
            .map(|b| {
                map.get(&(id * HIT_BUCKETS_PER_SERVICE + b), 0)
                    .map(|v| v.iter().sum())
                    .map_err(map_err(names::UNIT_HITS))
            })
            .collect()
    }
}

/// Name of loaded BPF program `id`, if it is still loaded.
#[must_use]
pub fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
}

/// Where `sluice run` pins the data path of `iface` unless told otherwise.
#[must_use]
pub fn default_pin_dir(iface: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/sluice").join(iface)
}

/// Counts the pinned-flow map pinned at `path` every `every`, on a thread
/// of its own, into `sluice_pinned_flows`: a walk of a full map is a
/// million `bpf()` calls, which the control loop should not wait for.
pub fn count_pinned_flows(path: PathBuf, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("sluice-pin-count".into())
        .spawn(move || {
            loop {
                match MapData::from_pin(&path) {
                    Ok(data) => {
                        let map: Result<HashMap<_, PinKey, Pin>, _> =
                            HashMap::try_from(aya::maps::Map::LruHashMap(data));
                        if let Ok(map) = map {
                            let n = map.keys().map_while(Result::ok).count();
                            crate::telemetry::pinned_flows(n as u64);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, path = %path.display(), "pinned-flow map not readable");
                    }
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to count pinned flows");
    }
}
