//! The data path pinned in bpffs: what a pin directory holds and records,
//! the checks before it is adopted, the id registry and owners read from
//! it, and its removal.

use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData};
use sluice_common::{
    maps::{InstanceName, names},
    owner_index,
};

use super::{OBJECT, XdpDatapath, map_err};
use crate::datapath::{DatapathError, owners::OwnerTable};

/// A data path pinned under a bpffs directory: every map at `<dir>/<MAP>`,
/// the XDP link at `<dir>/link`, and the interface and attach mode as empty
/// directories `iface=<name>` and `mode=<native|generic>`. While the
/// link is pinned the program stays attached with no agent running; a new
/// agent adopts the maps (owners, counters, pinned flows) and swaps its
/// program in atomically.
pub(super) struct Pins {
    pub(super) dir: PathBuf,
    pub(super) link: Option<aya::programs::links::PinnedLink>,
}

/// The value of a `key=value` directory under `dir`.
pub(super) fn pin_tag(dir: &Path, key: &str) -> Option<String> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        e.file_name()
            .to_str()?
            .strip_prefix(&format!("{key}="))
            .map(str::to_owned)
    })
}

/// This agent's map layout as the pin directory records it.
pub(super) fn layout_tag() -> String {
    format!("{:016x}", sluice_common::maps::LAYOUT)
}

/// Refuses pins this agent would misread: a layout other than its own, or
/// a map whose type, key or value size differs from the program's, or
/// whose size differs from what `sizes` (the plan) needs.
pub(super) fn check_pins(dir: &Path, sizes: &[(&'static str, u32)]) -> Result<(), DatapathError> {
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
pub(super) fn registry_of<T: std::borrow::Borrow<MapData>>(
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

impl XdpDatapath {
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
}
