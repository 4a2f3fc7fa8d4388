//! The worker loop: one message at a time from the supervisor, answered in order.
//!
//! The loop, not the engine, owns what every runtime must do the same way: the
//! export check, the output limit, and recycling an instance whose state is suspect
//! after a trap, timeout or memory limit. An engine only makes instances and runs
//! calls on them.

use crate::{EXIT_LOAD_FAILED, EXIT_PROTOCOL, Engine, Host, Instance};
use corral_protocol::{
    CallError, Code, FromWorker, LoadSpec, ToWorker, WorkerStats, error_chain, frame,
};
use std::time::Duration;

/// The plugin this worker serves: its spec, and an instance unless the last call
/// discarded it.
struct Plugin<I> {
    spec: LoadSpec,
    instance: Option<I>,
}

impl<I: Instance> Plugin<I> {
    /// Run one call: a fresh instance first if the last one was discarded, then the
    /// export check, the call, and the output limit.
    fn call<E: Engine<Instance = I>>(
        &mut self,
        engine: &mut E,
        function: &str,
        input: &[u8],
        deadline: Duration,
        host: &Host,
    ) -> Result<Vec<u8>, CallError> {
        let instance = match &mut self.instance {
            Some(i) => i,
            None => {
                let fresh = engine
                    .instantiate(&self.spec, host)
                    .map_err(|e| CallError::Trap {
                        message: format!("reloading after the last failure: {}", error_chain(&e)),
                    })?;
                self.instance.insert(fresh)
            }
        };
        if !instance.exports().iter().any(|e| e == function) {
            return Err(CallError::UnknownFunction {
                plugin: self.spec.plugin_id.clone(),
                function: function.to_owned(),
                exports: instance.exports().join(", "),
            });
        }
        let result = instance.call(function, input, deadline, host);
        if discards(&result) {
            self.instance = None;
        }
        let out = result?;
        let (size, limit) = (out.len() as u64, self.spec.limits.max_output_bytes);
        if size > limit {
            return Err(CallError::OutputTooLarge { size, limit });
        }
        Ok(out)
    }
}

/// Whether a call's outcome leaves the instance's state suspect, so that it must
/// never run again.
fn discards(result: &Result<Vec<u8>, CallError>) -> bool {
    matches!(
        result,
        Err(CallError::Trap { .. } | CallError::Timeout { .. } | CallError::MemoryLimit { .. })
    )
}

/// A compile helper's one job: the artefact written, `Loaded` with no exports (or
/// `LoadFailed`), and the exit. Nothing of the plugin runs.
fn compile_only<E: Engine>(engine: &mut E, spec: &LoadSpec, host: &Host) -> u8 {
    let written = crate::artifact_file().and_then(|mut out| {
        engine.precompile(spec, &mut out)?;
        out.sync_data()
            .map_err(|e| crate::LoadError::Engine(format!("cannot write the compiled module: {e}")))
    });
    let (reply, code) = match written {
        Ok(()) => (
            FromWorker::Loaded {
                exports: Vec::new(),
            },
            0,
        ),
        Err(e) => (
            FromWorker::LoadFailed {
                error: error_chain(&e),
            },
            EXIT_LOAD_FAILED,
        ),
    };
    match host.send(&reply) {
        Ok(()) => code,
        Err(_) => EXIT_PROTOCOL,
    }
}

/// Serve until shutdown; the worker's exit code.
pub(crate) fn serve<E: Engine>(engine: &mut E, host: &Host) -> u8 {
    let mut plugin: Option<Plugin<E::Instance>> = None;
    let mut stats = WorkerStats::default();
    loop {
        let msg = match host.next_message() {
            Ok(m) => m,
            // The supervisor went away: nothing left to serve.
            Err(frame::FrameError::Closed) => return 0,
            Err(e) => {
                eprintln!("corral worker: {e}");
                return EXIT_PROTOCOL;
            }
        };
        let reply = match msg {
            ToWorker::Load(spec) => {
                if plugin.is_some() {
                    eprintln!("corral worker: a second Load; a worker serves one plugin");
                    return EXIT_PROTOCOL;
                }
                if spec.code == Code::CompileOnly {
                    return compile_only(engine, &spec, host);
                }
                host.set_config(spec.config.clone(), spec.secrets.clone());
                match engine.instantiate(&spec, host) {
                    Ok(instance) if instance.exports().len() > corral_protocol::MAX_EXPORTS => {
                        let error = format!(
                            "the plugin exports {} functions; a plugin may export at most {}",
                            instance.exports().len(),
                            corral_protocol::MAX_EXPORTS
                        );
                        let _ = host.send(&FromWorker::LoadFailed { error });
                        return EXIT_LOAD_FAILED;
                    }
                    Ok(instance) => {
                        release_free_memory();
                        let exports = instance.exports().to_vec();
                        plugin = Some(Plugin {
                            spec,
                            instance: Some(instance),
                        });
                        FromWorker::Loaded { exports }
                    }
                    Err(e) => {
                        let error = error_chain(&e);
                        let _ = host.send(&FromWorker::LoadFailed { error });
                        return EXIT_LOAD_FAILED;
                    }
                }
            }
            ToWorker::Call {
                id,
                function,
                input,
                deadline_ms,
                start_by_us,
            } => {
                host.set_current_call(id);
                let deadline = Duration::from_millis(deadline_ms);
                let result = match plugin.as_mut() {
                    // It waited behind earlier calls until its caller stopped
                    // waiting: not run at all.
                    _ if start_by_us != 0 && corral_protocol::monotonic_us() > start_by_us => {
                        Err(CallError::Timeout { deadline_ms })
                    }
                    Some(p) => p.call(engine, &function, &input, deadline, host),
                    None => Err(CallError::BadInput {
                        reason: "no plugin loaded".into(),
                    }),
                };
                host.set_current_call(0);
                stats.calls += 1;
                stats.errors += u64::from(result.is_err());
                FromWorker::CallResult { id, result }
            }
            ToWorker::Stats => {
                stats.memory_bytes = plugin
                    .as_ref()
                    .and_then(|p| p.instance.as_ref())
                    .map_or(0, Instance::memory_bytes);
                FromWorker::Stats(stats.clone())
            }
            ToWorker::Shutdown { grace_ms } => {
                // Only a live instance runs its hook: one discarded after a trap is
                // not made again just to be shut down.
                if let Some(instance) = plugin.as_mut().and_then(|p| p.instance.as_mut()) {
                    instance.shutdown(Duration::from_millis(grace_ms), host);
                }
                return 0;
            }
            ToWorker::HostResult { id, .. } => {
                eprintln!("corral worker: answer to host call {id} that is not pending");
                return EXIT_PROTOCOL;
            }
        };
        if let Err(e) = host.send(&reply) {
            eprintln!("corral worker: {e}");
            return EXIT_PROTOCOL;
        }
    }
}

/// Give the C heap's free pages back to the kernel once the plugin is loaded: what
/// parsing and compiling it allocated and freed (QuickJS's parser, CPython's
/// import machinery) would otherwise stay resident for the worker's life.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes a pad and touches only the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_protocol::{EngineLimits, Runtime};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    /// What the fake plugin's functions do.
    #[derive(Clone, Default)]
    struct Script {
        /// Instances made so far (shared with every instance, read by the test).
        made: Arc<AtomicU32>,
        /// Fail every instantiation after this many.
        fail_after: Option<u32>,
        shutdowns: Arc<AtomicU32>,
    }

    struct FakeEngine(Script);

    struct FakeInstance {
        exports: Vec<String>,
        generation: u32,
        shutdowns: Arc<AtomicU32>,
    }

    impl Engine for FakeEngine {
        type Instance = FakeInstance;
        fn info(&self) -> crate::EngineInfo {
            crate::EngineInfo {
                runtime: Runtime::Wasm,
                version: "fake".into(),
            }
        }
        fn instantiate(
            &mut self,
            spec: &LoadSpec,
            _: &Host,
        ) -> Result<FakeInstance, crate::LoadError> {
            let made = self.0.made.load(SeqCst);
            if self.0.fail_after.is_some_and(|n| made >= n) {
                return Err(crate::LoadError::Plugin {
                    during: "init",
                    message: format!("{} refuses", spec.plugin_id),
                });
            }
            self.0.made.store(made + 1, SeqCst);
            Ok(FakeInstance {
                exports: vec!["big".into(), "echo".into(), "fail".into(), "trap".into()],
                generation: made + 1,
                shutdowns: Arc::clone(&self.0.shutdowns),
            })
        }
    }

    impl Instance for FakeInstance {
        fn exports(&self) -> &[String] {
            &self.exports
        }
        fn call(
            &mut self,
            function: &str,
            input: &[u8],
            _: Duration,
            _: &Host,
        ) -> Result<Vec<u8>, CallError> {
            match function {
                "echo" => Ok(
                    format!("{}:{}", self.generation, String::from_utf8_lossy(input)).into_bytes(),
                ),
                "big" => Ok(vec![b'x'; 100]),
                "fail" => Err(CallError::Plugin {
                    message: "no".into(),
                }),
                "trap" => Err(CallError::Trap {
                    message: "unreachable".into(),
                }),
                other => panic!("the loop let {other} through its export check"),
            }
        }
        fn shutdown(&mut self, _: Duration, _: &Host) {
            self.shutdowns.fetch_add(1, SeqCst);
        }
        fn memory_bytes(&self) -> u64 {
            4096 * u64::from(self.generation)
        }
    }

    /// The supervisor's end of a worker that runs `serve` on a thread.
    struct Supervisor {
        stream: UnixStream,
        worker: std::thread::JoinHandle<(u8, u32, u32)>,
    }

    impl Supervisor {
        fn start(script: Script) -> Supervisor {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let worker = std::thread::spawn(move || {
                let (made, shutdowns) = (Arc::clone(&script.made), Arc::clone(&script.shutdowns));
                let code = serve(&mut FakeEngine(script), &Host::new(theirs));
                (code, made.load(SeqCst), shutdowns.load(SeqCst))
            });
            Supervisor {
                stream: ours,
                worker,
            }
        }

        fn send(&mut self, msg: &ToWorker) {
            frame::write_msg(&mut self.stream, msg).unwrap();
        }

        fn recv(&mut self) -> FromWorker {
            frame::read_msg(&mut self.stream, frame::MAX_FRAME).unwrap()
        }

        fn load(&mut self) -> FromWorker {
            self.send(&ToWorker::Load(LoadSpec {
                plugin_id: "fake".into(),
                plugin_dir: "/nowhere".into(),
                entry: "plugin".into(),
                code: Code::Compile,
                limits: EngineLimits {
                    memory_bytes: 1 << 20,
                    max_output_bytes: 10,
                    init_deadline_ms: 1000,
                },
                config: Default::default(),
                secrets: Default::default(),
            }));
            self.recv()
        }

        fn call(&mut self, id: u64, function: &str, input: &str) -> Result<Vec<u8>, CallError> {
            self.send(&ToWorker::Call {
                id,
                function: function.into(),
                input: input.as_bytes().to_vec(),
                deadline_ms: 1000,
                start_by_us: 0,
            });
            match self.recv() {
                FromWorker::CallResult { id: got, result } => {
                    assert_eq!(got, id);
                    result
                }
                other => panic!("expected a result, got {other:?}"),
            }
        }

        /// Shut the worker down: (exit code, instances made, shutdown hooks run).
        fn shut_down(mut self) -> (u8, u32, u32) {
            self.send(&ToWorker::Shutdown { grace_ms: 100 });
            self.worker.join().unwrap()
        }
    }

    #[test]
    fn a_call_outside_the_exports_is_refused_with_the_exports_listed() {
        let mut s = Supervisor::start(Script::default());
        match s.load() {
            FromWorker::Loaded { exports } => assert_eq!(exports, ["big", "echo", "fail", "trap"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.call(1, "nope", ""),
            Err(CallError::UnknownFunction {
                plugin: "fake".into(),
                function: "nope".into(),
                exports: "big, echo, fail, trap".into(),
            })
        );
        assert_eq!(s.call(2, "echo", "a"), Ok(b"1:a".to_vec()));
        assert_eq!(s.shut_down(), (0, 1, 1));
    }

    #[test]
    fn a_call_past_its_start_by_is_answered_timeout_without_running() {
        let mut s = Supervisor::start(Script::default());
        s.load();
        // Sent behind others and still waiting when its caller stopped waiting.
        s.send(&ToWorker::Call {
            id: 1,
            function: "trap".into(),
            input: Vec::new(),
            deadline_ms: 250,
            start_by_us: corral_protocol::monotonic_us() - 1,
        });
        match s.recv() {
            FromWorker::CallResult { id: 1, result } => {
                assert_eq!(result, Err(CallError::Timeout { deadline_ms: 250 }));
            }
            other => panic!("{other:?}"),
        }
        // Not run: the trap would have discarded the instance (`1:` is the first).
        s.send(&ToWorker::Call {
            id: 2,
            function: "echo".into(),
            input: b"a".to_vec(),
            deadline_ms: 1000,
            start_by_us: corral_protocol::monotonic_us() + 60_000_000,
        });
        match s.recv() {
            FromWorker::CallResult { id: 2, result } => assert_eq!(result, Ok(b"1:a".to_vec())),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.shut_down(), (0, 1, 1));
    }

    #[test]
    fn a_trap_discards_the_instance_and_the_next_call_gets_a_fresh_one() {
        let mut s = Supervisor::start(Script::default());
        s.load();
        assert_eq!(s.call(1, "echo", "a"), Ok(b"1:a".to_vec()));
        // A plugin's own error keeps the instance.
        assert!(matches!(
            s.call(2, "fail", ""),
            Err(CallError::Plugin { .. })
        ));
        assert_eq!(s.call(3, "echo", "b"), Ok(b"1:b".to_vec()));
        assert!(matches!(s.call(4, "trap", ""), Err(CallError::Trap { .. })));
        assert_eq!(s.call(5, "echo", "c"), Ok(b"2:c".to_vec()));
        // Stats come from the live instance.
        s.send(&ToWorker::Stats);
        match s.recv() {
            FromWorker::Stats(st) => {
                assert_eq!((st.calls, st.errors, st.memory_bytes), (5, 2, 8192));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.shut_down(), (0, 2, 1));
    }

    #[test]
    fn output_past_max_output_is_refused_and_keeps_the_instance() {
        let mut s = Supervisor::start(Script::default());
        s.load();
        assert_eq!(
            s.call(1, "big", ""),
            Err(CallError::OutputTooLarge {
                size: 100,
                limit: 10
            })
        );
        assert_eq!(s.call(2, "echo", "a"), Ok(b"1:a".to_vec()));
        assert_eq!(s.shut_down(), (0, 1, 1));
    }

    #[test]
    fn an_instance_that_cannot_be_made_again_fails_the_call_as_a_trap() {
        let mut s = Supervisor::start(Script {
            fail_after: Some(1),
            ..Script::default()
        });
        s.load();
        assert!(matches!(s.call(1, "trap", ""), Err(CallError::Trap { .. })));
        assert_eq!(
            s.call(2, "echo", "a"),
            Err(CallError::Trap {
                message: "reloading after the last failure: init: fake refuses".into()
            })
        );
        // No live instance: the shutdown hook is not run on a new one.
        assert_eq!(s.shut_down(), (0, 1, 0));
    }

    #[test]
    fn a_load_that_fails_is_reported_and_ends_the_worker() {
        let mut s = Supervisor::start(Script {
            fail_after: Some(0),
            ..Script::default()
        });
        assert_eq!(
            s.load(),
            FromWorker::LoadFailed {
                error: "init: fake refuses".into()
            }
        );
        assert_eq!(s.worker.join().unwrap(), (EXIT_LOAD_FAILED, 0, 0));
    }

    #[test]
    fn a_second_load_is_a_protocol_error() {
        let mut s = Supervisor::start(Script::default());
        s.load();
        s.send(&ToWorker::Load(LoadSpec {
            plugin_id: "other".into(),
            plugin_dir: "/".into(),
            entry: "x".into(),
            code: Code::Compile,
            limits: EngineLimits {
                memory_bytes: 1,
                max_output_bytes: 1,
                init_deadline_ms: 1,
            },
            config: Default::default(),
            secrets: Default::default(),
        }));
        assert_eq!(s.worker.join().unwrap(), (EXIT_PROTOCOL, 1, 0));
    }
}
