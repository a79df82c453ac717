//! Loads the XDP program, sizes and writes its maps, attaches it, and reads
//! its counters.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, Xdp,
        xdp::{XdpLinkId, XdpMode},
    },
};
use sluice_common::{
    HIT_BUCKETS_PER_SERVICE, counters,
    maps::{
        INSTANCE_LIVE, InstanceCounters, InstanceEntry, PROGRAM_NAME, ServiceCounters,
        ServiceEntry, ServiceKey, names,
    },
    owner_index,
};

use crate::{assign::Group, plan::Plan};

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

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this build carries no XDP program (it was built without bpf-linker); run `cargo xtask setup`, then rebuild"
    )]
    ObjectMissing,
    #[error("loading the XDP object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no {what} `{name}`")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("bpffs directory {dir}")]
    PinDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "map `{map}` pinned in {dir} has {pinned} entries, this config needs {wanted}; run `sluice detach --pin-dir {dir}` (it drops pinned flows) and start again"
    )]
    PinMismatch {
        dir: std::path::PathBuf,
        map: &'static str,
        pinned: u32,
        wanted: u32,
    },
    #[error("adopting the data path pinned in {dir}: {problem}")]
    Adopt {
        dir: std::path::PathBuf,
        problem: String,
    },
    #[error("mapping the owner array into memory")]
    Mmap {
        #[source]
        source: std::io::Error,
    },
    #[error("program `{PROGRAM_NAME}`")]
    Program(#[source] ProgramError),
    #[error("attaching to `{iface}` failed")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (native XDP).
    Native,
    /// In the generic kernel path (slower; for drivers without XDP).
    Generic,
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    owners: OwnerTable,
    /// Set when the data path lives on in bpffs across agent restarts.
    pins: Option<Pins>,
}

/// A data path pinned under a bpffs directory: every map at `<dir>/<MAP>`,
/// the XDP link at `<dir>/link`, and the interface and attach mode as empty
/// directories `iface=<name>` and `mode=<native|generic>`. While the
/// link is pinned the program stays attached with no agent running; a new
/// agent adopts the maps (owners, counters, pinned flows) and swaps its
/// program in atomically.
struct Pins {
    dir: std::path::PathBuf,
    link: Option<aya::programs::links::PinnedLink>,
}

/// The owner array, mapped into our memory (`BPF_F_MMAPABLE`): a group's
/// owners are rewritten with plain atomic stores, which the data path sees
/// at once, instead of one syscall per unit.
struct OwnerTable {
    /// Elements are 8 bytes apart (value size rounded up to 8).
    ptr: std::ptr::NonNull<u64>,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value and only accessed through
// atomics.
unsafe impl Send for OwnerTable {}

/// An array map's elements are `value_size` rounded up to 8 bytes apart.
const OWNER_STRIDE: usize = size_of::<u64>();

impl OwnerTable {
    fn map(data: &MapData, entries: u32) -> Result<Self, DataplaneError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let len = (entries as usize * OWNER_STRIDE).next_multiple_of(4096);
        // SAFETY: mapping a BPF_F_MMAPABLE array map of `entries` elements,
        // shared, for reading and writing; the length covers the elements.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: std::ptr::NonNull::new(ptr.cast()).expect("mmap succeeded"),
            len,
            entries,
        })
    }

    fn slot(&self, index: u32) -> &std::sync::atomic::AtomicU32 {
        assert!(
            index < self.entries,
            "owner index {index} out of {}",
            self.entries
        );
        // SAFETY: in bounds (checked); each element starts 8-byte aligned
        // and its first 4 bytes are the u32 value; only accessed atomically.
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(index as usize)
                .cast::<std::sync::atomic::AtomicU32>()
        }
    }

    fn set(&self, index: u32, owner: u32) {
        self.slot(index)
            .store(owner, std::sync::atomic::Ordering::Release);
    }

    fn get(&self, index: u32) -> u32 {
        self.slot(index).load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for OwnerTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The value of a `key=value` directory under `dir`.
fn pin_tag(dir: &std::path::Path, key: &str) -> Option<String> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        e.file_name()
            .to_str()?
            .strip_prefix(&format!("{key}="))
            .map(str::to_owned)
    })
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Dataplane {
    /// Loads the program with every map sized for `plan`. Nothing is
    /// attached and no entry written yet.
    pub fn load(plan: &Plan) -> Result<Self, DataplaneError> {
        Self::load_with(plan, None)
    }

    /// Sizes of every map for `plan`.
    fn sizes(plan: &Plan) -> [(&'static str, u32); 8] {
        let services = u32::try_from(plan.services.len()).expect("bounded").max(1);
        let keys = u32::try_from(plan.services.iter().map(|s| s.keys.len()).sum::<usize>())
            .expect("bounded")
            .max(1);
        // Instance ids start at 1: slot 0 stays empty.
        let instances = u32::try_from(plan.instances.len()).expect("bounded") + 1;
        [
            (names::SERVICES, keys),
            (names::OWNERS, plan.owner_entries()),
            (names::INSTANCES, instances),
            (names::DELIVER, instances),
            (names::INSTANCE_COUNTERS, instances),
            (names::SERVICE_COUNTERS, services),
            (names::UNIT_HITS, services * HIT_BUCKETS_PER_SERVICE),
            (names::PINNED, plan.pinned_flows.max(1)),
        ]
    }

    /// Loads as [`Self::load`]; with `pin_dir`, every map is pinned there,
    /// or, if a previous agent left them pinned, adopted (sizes must match).
    pub fn load_with(
        plan: &Plan,
        pin_dir: Option<&std::path::Path>,
    ) -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::ObjectMissing);
        }
        let sizes = Self::sizes(plan);
        let mut loader = EbpfLoader::new();
        for (name, n) in sizes {
            loader.map_max_entries(name, n);
        }
        let paths: Vec<(&str, std::path::PathBuf)> = pin_dir
            .map(|d| names::ALL.iter().map(|n| (*n, d.join(n))).collect())
            .unwrap_or_default();
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                dir: dir.to_owned(),
                source,
            })?;
            // A pinned map is reused as it is: refuse one of another size
            // rather than index past its end.
            for (name, n) in sizes {
                if let Ok(info) = aya::maps::MapInfo::from_pin(dir.join(name))
                    && info.max_entries() != n
                {
                    return Err(DataplaneError::PinMismatch {
                        dir: dir.to_owned(),
                        map: name,
                        pinned: info.max_entries(),
                        wanted: n,
                    });
                }
            }
            for (name, path) in &paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(DataplaneError::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::Missing {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(DataplaneError::Program)?;
        prog.load().map_err(DataplaneError::Program)?;
        let owners = match ebpf.map(names::OWNERS) {
            Some(aya::maps::Map::Array(data)) => OwnerTable::map(data, plan.owner_entries())?,
            _ => {
                return Err(DataplaneError::Missing {
                    what: "array map",
                    name: names::OWNERS,
                });
            }
        };
        Ok(Self {
            ebpf,
            link: None,
            owners,
            pins: pin_dir.map(|d| Pins {
                dir: d.to_owned(),
                link: None,
            }),
        })
    }

    /// Writes the whole plan: instances and their veths first, then owners,
    /// and the services last, so no packet matches a service whose owners
    /// are not in place yet.
    pub fn program(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        {
            let mut instances: Array<&mut MapData, InstanceEntry> =
                self.map_mut(names::INSTANCES)?;
            for i in &plan.instances {
                let entry = InstanceEntry {
                    mac: i.mac,
                    pad: 0,
                    flags: INSTANCE_LIVE,
                    service_id: i.service_id,
                };
                instances
                    .set(i.id, entry, 0)
                    .map_err(map_err(names::INSTANCES))?;
            }
        }
        {
            let mut deliver: DevMap<&mut MapData> = self.map_mut(names::DELIVER)?;
            for i in &plan.instances {
                deliver.set(i.id, i.ifindex, None, 0).map_err(|e| match e {
                    aya::maps::xdp::XdpMapError::MapError(source) => DataplaneError::Map {
                        name: names::DELIVER,
                        source,
                    },
                    aya::maps::xdp::XdpMapError::ChainedProgramNotSupported => {
                        unreachable!("no chained program is given")
                    }
                })?;
            }
        }
        for s in &plan.services {
            for (g, owner) in &s.groups {
                self.set_group_owner(s.id, *g, *owner)?;
            }
        }
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceEntry> =
            self.map_mut(names::SERVICES)?;
        // An adopted map may hold services this plan no longer has.
        let stale: Vec<ServiceKey> = services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !plan.services.iter().any(|s| s.keys.contains(k)))
            .collect();
        for k in &stale {
            services.remove(k).map_err(map_err(names::SERVICES))?;
        }
        for s in &plan.services {
            for k in &s.keys {
                services
                    .insert(k, s.entry, 0)
                    .map_err(map_err(names::SERVICES))?;
            }
        }
        Ok(())
    }

    /// Points every unit of `group` of service `service_id` at `owner`
    /// (`NO_OWNER` leaves the group unowned).
    pub fn set_group_owner(
        &mut self,
        service_id: u32,
        group: Group,
        owner: u32,
    ) -> Result<(), DataplaneError> {
        let t = std::time::Instant::now();
        for unit in group.units() {
            self.owners.set(owner_index(service_id, unit), owner);
        }
        crate::telemetry::map_write(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// The owner the data path has for `unit` of service `service_id`.
    #[must_use]
    pub fn owner_of_unit(&self, service_id: u32, unit: u32) -> u32 {
        self.owners.get(owner_index(service_id, unit))
    }

    /// Attaches to `iface`: native XDP, or generic mode when the driver
    /// refuses (with a warning, since generic mode is much slower).
    pub fn attach(
        &mut self,
        iface: &str,
        force_generic: bool,
    ) -> Result<AttachMode, DataplaneError> {
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

    /// Takes over the link a previous agent pinned, swapping this program in
    /// (one `bpf_link_update`: no packet sees no program).
    fn adopt(&mut self, dir: &std::path::Path, iface: &str) -> Result<AttachMode, DataplaneError> {
        let pin_err = |what: &str| DataplaneError::Adopt {
            dir: dir.to_owned(),
            problem: what.to_owned(),
        };
        let pinned_iface = pin_tag(dir, "iface").unwrap_or_default();
        if pinned_iface != iface {
            return Err(pin_err(&format!(
                "it holds a link on `{pinned_iface}`, not `{iface}`"
            )));
        }
        let mode = match pin_tag(dir, "mode").as_deref() {
            Some("generic") => AttachMode::Generic,
            _ => AttachMode::Native,
        };
        let fd_link = aya::programs::links::PinnedLink::from_pin(dir.join("link"))
            .map_err(|e| pin_err(&format!("reading the pinned link: {e}")))?
            .unpin()
            .map_err(|e| pin_err(&format!("unpinning the link: {e}")))?;
        let xdp_link = aya::programs::xdp::XdpLink::try_from(fd_link)
            .map_err(|e| pin_err(&format!("the pinned link is not an XDP link: {e}")))?;
        let id = self
            .program_mut()?
            .attach_to_link(xdp_link)
            .map_err(DataplaneError::Program)?;
        self.link = Some(id);
        self.pin_link(dir, iface, mode)?;
        Ok(mode)
    }

    /// Pins the link, so the program stays attached when this agent exits.
    fn pin_link(
        &mut self,
        dir: &std::path::Path,
        iface: &str,
        mode: AttachMode,
    ) -> Result<(), DataplaneError> {
        let Some(id) = self.link.take() else {
            return Ok(());
        };
        let xdp_link = self
            .program_mut()?
            .take_link(id)
            .map_err(DataplaneError::Program)?;
        let fd_link = match aya::programs::links::FdLink::try_from(xdp_link) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "this kernel attached XDP without a bpf link: hot restart is unavailable");
                return Ok(());
            }
        };
        let pinned = fd_link
            .pin(dir.join("link"))
            .map_err(|e| DataplaneError::Adopt {
                dir: dir.to_owned(),
                problem: format!("pinning the link: {e}"),
            })?;
        let io = |source| DataplaneError::PinDir {
            dir: dir.to_owned(),
            source,
        };
        // bpffs holds only pinned objects and directories: the facts the
        // next agent needs are directory names.
        for (key, value) in [
            ("iface", iface),
            (
                "mode",
                match mode {
                    AttachMode::Native => "native",
                    AttachMode::Generic => "generic",
                },
            ),
        ] {
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
    ) -> Result<AttachMode, DataplaneError> {
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
            Err(source) => Err(DataplaneError::Attach {
                iface: iface.to_owned(),
                source: native_err.unwrap_or(source),
            }),
        }
    }

    /// Marks instance `id` live or not, keeping its MAC and service: the
    /// packets of a dead instance are unowned and its pins no longer hold.
    pub fn set_instance_live(&mut self, id: u32, live: bool) -> Result<(), DataplaneError> {
        let mut instances: Array<&mut MapData, InstanceEntry> = self.map_mut(names::INSTANCES)?;
        let mut e = instances.get(&id, 0).map_err(map_err(names::INSTANCES))?;
        if live {
            e.flags |= INSTANCE_LIVE;
        } else {
            e.flags &= !INSTANCE_LIVE;
        }
        instances.set(id, e, 0).map_err(map_err(names::INSTANCES))
    }

    /// Registers the agent's `AF_XDP` socket `fd` for receive queue `queue`:
    /// from now on, packets of unowned units on that queue are punted to it.
    pub fn set_punt_socket(
        &mut self,
        queue: u32,
        fd: std::os::fd::RawFd,
    ) -> Result<(), DataplaneError> {
        let mut map: aya::maps::XskMap<&mut MapData> = self.map_mut(names::PUNT)?;
        map.set(queue, fd, 0).map_err(map_err(names::PUNT))
    }

    /// Whether the data path is pinned (it outlives this agent).
    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.link.is_some())
    }

    /// Removes everything pinned under `dir`: the link (the program is
    /// detached when no one else holds it) and every map.
    pub fn remove_pins(dir: &std::path::Path) -> Result<bool, DataplaneError> {
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
        std::fs::remove_dir(dir).map_err(|source| DataplaneError::PinDir {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(true)
    }

    /// Detaches from the interface (dropping the dataplane does it too).
    /// A pinned data path is left attached for the next agent; use
    /// [`Self::remove_pins`] to take it down.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some(link) = self.link.take() {
            self.program_mut()?
                .detach(link)
                .map_err(DataplaneError::Program)?;
        }
        Ok(())
    }

    /// The loaded object, for tools and benchmarks that need a map or
    /// program this type does not wrap.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program_ref(&self) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or(DataplaneError::Missing {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::Missing {
                what: "program",
                name: PROGRAM_NAME,
            })?
            .try_into()
            .map_err(DataplaneError::Program)
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::Missing { what: "map", name })?
            .try_into()
            .map_err(map_err(name))
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        self.ebpf
            .map(name)
            .ok_or(DataplaneError::Missing { what: "map", name })?
            .try_into()
            .map_err(map_err(name))
    }

    /// Global counters summed over CPUs, indexed as in
    /// [`sluice_common::counters`].
    pub fn global_counters(&self) -> Result<[u64; counters::COUNT as usize], DataplaneError> {
        let map: PerCpuArray<&MapData, u64> = self.map(names::GLOBAL_COUNTERS)?;
        let mut out = [0u64; counters::COUNT as usize];
        for (i, slot) in (0u32..).zip(out.iter_mut()) {
            *slot = map
                .get(&i, 0)
                .map_err(map_err(names::GLOBAL_COUNTERS))?
                .iter()
                .sum();
        }
        Ok(out)
    }

    /// Entry `id` of per-CPU map `name`, summed over CPUs.
    fn per_cpu_sum<T>(&self, name: &'static str, id: u32) -> Result<T, DataplaneError>
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

    /// Counters of service `id`, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<ServiceCounters, DataplaneError> {
        self.per_cpu_sum(names::SERVICE_COUNTERS, id)
    }

    /// Counters of instance `id`, summed over CPUs.
    pub fn instance_counters(&self, id: u32) -> Result<InstanceCounters, DataplaneError> {
        self.per_cpu_sum(names::INSTANCE_COUNTERS, id)
    }

    /// Hit counts of service `id`'s unit buckets, summed over CPUs.
    pub fn unit_hits(&self, id: u32) -> Result<Vec<u64>, DataplaneError> {
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
