//! One sweep point: build the method's policy at the budget, evaluate the task under it, measure speed,
//! and return the record, finished or failed. Never returns an error: a failure is the record's status.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use moe_models::{Model, Renormalize};

use super::model::RunCtx;
use super::speed::measure_speed;
use super::task_data::TaskData;
use crate::methods::{build, routing_key, Inputs, Method, ModelShape};
use crate::results::{PointKey, Record, Status, RESULTS_SCHEMA_VERSION};
use crate::scorer::{ActivationMeter, Scorer, TextPrefix};
use crate::tasks::Task;

/// What the points of one (model, task) share.
pub struct PointEnv<'a> {
    /// The sweep.
    pub rc: &'a RunCtx<'a>,
    /// The model.
    pub model: &'a Model,
    /// Its tokenizer (GSM8K decodes generations).
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// The scorer over the model.
    pub scorer: &'a Scorer<'a>,
    /// Model facts.
    pub shape: &'a ModelShape,
    /// The task.
    pub task: &'a Task,
    /// Its prepared inputs.
    pub data: &'a TaskData,
    /// The policy-independent start of the task's passes, for a text task (see [`TaskData::evaluate`]).
    pub prefix: Option<&'a TextPrefix<'a>>,
    /// Mixing rule for reduced k.
    pub renormalize: Renormalize,
    /// The spec as recorded, with the model's facts.
    pub record_spec: &'a serde_json::Value,
}

/// Run one point. `inputs` is `Err` when something the method needs could not be measured; `reference`
/// is the full model's NLL on this task, if known; `shared` holds the finished points of this model and
/// task by routing key ([`routing_key`]): a point that routes like one of them copies its results.
#[allow(clippy::too_many_arguments)]
pub fn run_point(
    env: &PointEnv<'_>,
    key: &PointKey,
    method: Method,
    budget_total: u32,
    full_budget: u32,
    inputs: std::result::Result<Inputs<'_>, String>,
    reference: Option<f64>,
    shared: &BTreeMap<String, Record>,
) -> Record {
    let mut record = Record {
        schema_version: RESULTS_SCHEMA_VERSION,
        run_id: env.rc.run_id.to_string(),
        key: key.clone(),
        status: Status::Ok,
        budget_total,
        full_budget,
        metrics: BTreeMap::new(),
        allocation: None,
        realized_per_layer: None,
        unique_experts_per_layer: None,
        predicted_delta: None,
        shared_with: None,
        provenance: env.rc.provenance.clone(),
        spec: env.record_spec.clone(),
    };
    let outcome = match inputs {
        Ok(inputs) => evaluate(env, &mut record, method, budget_total, &inputs, reference, shared),
        Err(e) => Err(anyhow::anyhow!(e)),
    };
    if let Err(e) = outcome {
        record.status = Status::Failed { error: format!("{e:#}") };
    }
    record
}

fn evaluate(
    env: &PointEnv<'_>,
    record: &mut Record,
    method: Method,
    budget_total: u32,
    inputs: &Inputs<'_>,
    reference: Option<f64>,
    shared: &BTreeMap<String, Record>,
) -> Result<()> {
    let spec = env.rc.spec;
    let tm = env.rc.timings;
    let built = tm.time("point: build policy", || build(method, budget_total, env.shape, inputs))?;
    record.allocation = built.allocation.clone();
    record.predicted_delta = built.predicted_delta;
    if let Some(o) = record.spec.as_object_mut() {
        o.insert("method_params".into(), built.params.clone());
    }
    if let Some(from) = routing_key(method, built.allocation.as_deref()).and_then(|k| shared.get(&k)) {
        // The same routing on the same inputs: the same metrics (delta_nll included, against the same
        // reference) and realized activations; the speeds are that routing's measurement.
        record.metrics = from.metrics.clone();
        record.realized_per_layer = from.realized_per_layer.clone();
        record.unique_experts_per_layer = from.unique_experts_per_layer.clone();
        record.shared_with = Some(from.key.method.clone());
        return Ok(());
    }
    let mut meter = ActivationMeter::new(&env.shape.moe_layers, env.shape.experts);
    let t = Instant::now();
    let metrics = tm.time("point: evaluate", || env.data.evaluate(env.scorer, env.prefix, env.model, env.tokenizer, built.policy.as_ref(), &mut meter, spec))?;
    record.metrics.extend(metrics);
    record.metrics.insert("eval_seconds".into(), t.elapsed().as_secs_f64());
    let realized = tm.time("point: evaluate", || meter.finish())?;
    record.metrics.insert("realized_activations_per_token".into(), realized.per_token_total());
    record.realized_per_layer = Some(realized.per_layer);
    record.unique_experts_per_layer = Some(realized.unique_per_layer);
    if method == Method::Full && record.metrics.contains_key("nll") {
        record.metrics.insert("delta_nll".into(), 0.0);
    } else if let (Some(r), Some(nll)) = (reference, record.metrics.get("nll").copied()) {
        record.metrics.insert("delta_nll".into(), nll - r);
    }
    if spec.speed && matches!(env.task, Task::Text { .. }) {
        let (prefill, decode) = tm.time("point: speed", || measure_speed(env.model, built.policy.as_ref(), env.renormalize, env.data, spec))?;
        record.metrics.insert("prefill_tokens_per_s".into(), prefill);
        record.metrics.insert("decode_tokens_per_s".into(), decode);
    }
    Ok(())
}
