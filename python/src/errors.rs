//! The exceptions: `BccpError` (the base every bccp failure derives from), `BccpInputError`
//! (also a `ValueError`: bad arguments, shapes, values, files) and `BccpRuntimeError` (also a
//! `RuntimeError`: a failure while computing or reading). Rust panics never cross into Python:
//! [`compute`] runs the library with the GIL released and turns a panic into a
//! `BccpRuntimeError`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

static BASE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static INPUT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static RUNTIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Builds `class name(*bases)` in module `bccp` with a docstring.
fn new_class<'py>(
    py: Python<'py>,
    name: &str,
    bases: Vec<Bound<'py, PyAny>>,
    doc: &str,
) -> PyResult<Bound<'py, PyType>> {
    let dict = PyDict::new(py);
    dict.set_item("__module__", "bccp")?;
    dict.set_item("__doc__", doc)?;
    let class = py
        .get_type::<PyType>()
        .call1((name, PyTuple::new(py, bases)?, dict))?;
    Ok(class.cast_into::<PyType>()?)
}

/// Creates the three exception classes and adds them to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let builtins = py.import("builtins")?;
    let base = new_class(
        py,
        "BccpError",
        vec![builtins.getattr("Exception")?],
        "Any failure reported by bccp; the message is the library's (the CLI prints the same).",
    )?;
    let input = new_class(
        py,
        "BccpInputError",
        vec![base.clone().into_any(), builtins.getattr("ValueError")?],
        "Bad input: an argument, shape, value or file that bccp refuses (a ValueError).",
    )?;
    let runtime = new_class(
        py,
        "BccpRuntimeError",
        vec![base.clone().into_any(), builtins.getattr("RuntimeError")?],
        "A failure while computing or reading (a RuntimeError).",
    )?;
    m.add("BccpError", &base)?;
    m.add("BccpInputError", &input)?;
    m.add("BccpRuntimeError", &runtime)?;
    let _ = BASE.set(py, base.unbind());
    let _ = INPUT.set(py, input.unbind());
    let _ = RUNTIME.set(py, runtime.unbind());
    Ok(())
}

/// What kind of failure a message reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Input,
    Runtime,
}

/// A bccp failure, not yet raised (built without the GIL).
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn input(message: impl ToString) -> Self {
        Self {
            kind: Kind::Input,
            message: message.to_string(),
        }
    }

    pub fn runtime(message: impl ToString) -> Self {
        Self {
            kind: Kind::Runtime,
            message: message.to_string(),
        }
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> PyErr {
        Python::attach(|py| {
            let cell = match f.kind {
                Kind::Input => &INPUT,
                Kind::Runtime => &RUNTIME,
            };
            match cell.get(py).or_else(|| BASE.get(py)) {
                Some(class) => PyErr::from_type(class.bind(py).clone(), f.message),
                None => pyo3::exceptions::PyRuntimeError::new_err(f.message),
            }
        })
    }
}

/// `Err(BccpInputError(message))`.
pub fn input_error<T>(message: impl ToString) -> PyResult<T> {
    Err(Failure::input(message).into())
}

/// Runs `work` with the GIL released; a panic becomes a `BccpRuntimeError` naming it as a bug.
pub fn compute<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    F: FnOnce() -> Result<T, Failure> + Send,
    T: Send,
{
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(work)));
    match outcome {
        Ok(result) => result.map_err(PyErr::from),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(Failure::runtime(format!(
                "internal error (a bug in bccp, please report it): {why}"
            ))
            .into())
        }
    }
}
