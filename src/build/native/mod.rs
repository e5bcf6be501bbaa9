#[allow(dead_code)]
pub mod csum;
#[allow(dead_code)]
pub mod htree;
