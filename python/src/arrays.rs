//! numpy arrays in and out: borrowed row-major slices of the caller's arrays (no copy), and
//! results handed to numpy as owned buffers (no copy either).

use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::input_error;

/// A borrowed C-contiguous matrix: (values, rows, columns).
pub fn matrix<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray2<'_, T>,
    what: &str,
) -> PyResult<(&'a [T], usize, usize)> {
    let (rows, cols) = (a.shape()[0], a.shape()[1]);
    match a.as_slice() {
        Ok(values) => Ok((values, rows, cols)),
        Err(_) => input_error(format!(
            "{what} must be a C-contiguous array (numpy.ascontiguousarray makes one)"
        )),
    }
}

/// A borrowed contiguous vector.
pub fn vector<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    what: &str,
) -> PyResult<&'a [T]> {
    match a.as_slice() {
        Ok(values) => Ok(values),
        Err(_) => input_error(format!("{what} must be a contiguous 1-D array")),
    }
}

/// `values` as a numpy matrix [rows, cols] that owns the vector's buffer.
pub fn to_matrix<T: numpy::Element>(
    py: Python<'_>,
    values: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    PyArray1::from_vec(py, values).reshape([rows, cols])
}

/// `values` as a numpy vector that owns the vector's buffer.
pub fn to_vector<T: numpy::Element>(py: Python<'_>, values: Vec<T>) -> Bound<'_, PyArray1<T>> {
    PyArray1::from_vec(py, values)
}
