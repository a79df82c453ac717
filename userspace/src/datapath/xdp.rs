//! The real data path: loads the XDP program, sizes and writes its maps,
//! attaches it (native, or generic as a fallback), pins it in bpffs so it
//! outlives the agent, adopts what a previous agent pinned, and reads its
//! counters.
//!
//! This file owns loading: the embedded objects, [`XdpDatapath`] and its
//! maps sized for a plan, and the typed access to the object's maps and
//! program. Beside it, by job:
//!
//! - `write`: the plan and every later change written into the maps (the
//!   [`Datapath`](super::Datapath) implementation);
//! - `counters`: the counters read back, summed over CPUs;
//! - `attach`: attaching, adopting a pinned link, detaching;
//! - `pins`: the bpffs pin directory (its checks, what it holds, removal).

mod attach;
mod counters;
mod pins;
mod write;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{Xdp, xdp::XdpLinkId},
};
use sluice_common::{
    HIT_BUCKETS_PER_SERVICE,
    maps::{PROGRAM_NAME, names},
    owner_index,
};

use self::pins::{Pins, check_pins, layout_tag, pin_tag};
pub use self::{
    counters::count_pinned_flows,
    write::{FenceWriter, ProgramStep},
};
use super::{DatapathError, owners::OwnerTable, service_table};
use crate::plan::Plan;

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
    /// `CLUSTER`, shared with the [`FenceWriter`]s given out.
    cluster: write::ClusterMap,
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
        let cluster = match ebpf.map(names::CLUSTER) {
            Some(aya::maps::Map::Array(data)) => write::cluster_map(data)?,
            _ => {
                return Err(DatapathError::Missing {
                    what: "array map",
                    name: names::CLUSTER,
                });
            }
        };
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
            cluster,
        })
    }

    /// A read-only handle on the owner array, for readers outside the
    /// control loop (the L7 distributor, on its own threads).
    #[must_use]
    pub fn owner_view(&self) -> OwnerView {
        OwnerView(self.owners.clone())
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
