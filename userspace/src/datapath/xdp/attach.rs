//! Attaching the program to the interface: fresh (native, or generic as a
//! fallback), or by adopting the link a previous agent pinned; pinning the
//! link; detaching.

use std::path::Path;

use aya::programs::xdp::XdpMode;

use super::{XdpDatapath, pins::pin_tag};
use crate::datapath::{AttachMode, DatapathError};

impl XdpDatapath {
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
}
