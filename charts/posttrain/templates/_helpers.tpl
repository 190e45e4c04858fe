{{/*
Names, labels and small shared snippets. Every template takes its names and labels from here.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "posttrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name: fullnameOverride, else the release name when it already contains the chart
name, else "<release>-<chart>". 63 characters at most (DNS-1123 label).
*/}}
{{- define "posttrain.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>", as the helm.sh/chart label wants it. */}}
{{- define "posttrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "posttrain.labels" -}}
helm.sh/chart: {{ include "posttrain.chart" . }}
{{ include "posttrain.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: posttrain
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the operator pods; they never change across upgrades. */}}
{{- define "posttrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "posttrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The service account the operator runs as. */}}
{{- define "posttrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "posttrain.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The metrics Service; Prometheus Operator names the scrape job after it. */}}
{{- define "posttrain.metricsServiceName" -}}
{{- printf "%s-metrics" (include "posttrain.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "repository:tag" or "repository@digest"; the tag defaults to the chart's appVersion. */}}
{{- define "posttrain.imageRef" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Lease the replicas elect a leader with; the operator hard-codes this name. */}}
{{- define "posttrain.leaseName" -}}
posttrain-operator-leader
{{- end -}}

{{/*
True (non-empty) when the cluster serves the Prometheus Operator's API. The ServiceMonitor,
PodMonitor and PrometheusRule render only then, and only when their values enable them.
*/}}
{{- define "posttrain.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/*
Rules of the operator on namespaced resources: the same in the ClusterRole (watch-all) and in
each per-namespace Role (a list of namespaces). Exactly the calls it makes (operator/kube.py and
kopf's watches), nothing more:
- posttrainingjobs: watch them; patch to take off the finalizer older versions added.
- posttrainingjobs/status: the one status write. posttrainingjobs/finalizers: children carry
  ownerReferences with blockOwnerDeletion, which OwnerReferencesPermissionEnforcement allows
  only to whoever may update the owner's finalizers.
- rayjobs: create-or-get, list, watch, patch (suspend, stop).
- configmaps: create-or-get the spec ConfigMap. networkpolicies: create-or-get one per job.
- persistentvolumeclaims: read the claims a job names (ReadWriteMany check).
- pods, events: list a starting run's pods and its RayCluster's Events (pods that cannot start);
  events: create (the job's Events).
*/}}
{{- define "posttrain.namespacedRules" -}}
- apiGroups: ["posttrain.dev"]
  resources: ["posttrainingjobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["posttrain.dev"]
  resources: ["posttrainingjobs/status"]
  verbs: ["patch"]
- apiGroups: ["posttrain.dev"]
  resources: ["posttrainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end -}}

{{/*
The operator's setting for every job's NetworkPolicy (POSTTRAIN_JOB_NETWORK_POLICY), as JSON: the
chart's jobs.networkPolicy plus who the operator is (this release's namespace and pod labels).
*/}}
{{- define "posttrain.jobNetworkPolicy" -}}
{{- $np := .Values.jobs.networkPolicy -}}
{{- $operator := dict "namespace" .Release.Namespace "podLabels" (include "posttrain.selectorLabels" . | fromYaml) -}}
{{- dict "enabled" $np.enabled "operator" $operator "prometheus" $np.prometheus "kuberay" $np.kuberay "extraIngress" $np.extraIngress | toJson -}}
{{- end -}}

{{/*
Checks values that the schema cannot express; fails the render with a message saying what to
change.
*/}}
{{- define "posttrain.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: several replicas would reconcile the same jobs at once; set leaderElection.enabled=true or replicaCount=1" (int .Values.replicaCount)) -}}
{{- end -}}
{{- if ne (len .Values.operator.watchNamespaces) (len (uniq .Values.operator.watchNamespaces)) -}}
{{- fail (printf "operator.watchNamespaces lists a namespace twice: %s" (join ", " .Values.operator.watchNamespaces)) -}}
{{- end -}}
{{- end -}}

{{/* A Prometheus duration ("90s", "30m", "2h", "1d") in seconds, for PromQL arithmetic. */}}
{{- define "posttrain.durationSeconds" -}}
{{- $m := regexFind "^[0-9]+" . -}}
{{- $unit := trimPrefix $m . -}}
{{- $scale := get (dict "s" 1 "m" 60 "h" 3600 "d" 86400) $unit -}}
{{- if or (not $m) (not $scale) -}}
{{- fail (printf "%q is not a duration like 90s, 30m, 2h or 1d" .) -}}
{{- end -}}
{{- mul (atoi $m) $scale -}}
{{- end -}}

{{/*
PromQL label matchers selecting the operator's own series (no braces). The ServiceMonitor keeps
the operator's labels (honorLabels), so per-job series carry the job's namespace, and the
scrape job (the metrics Service's name) is what tells this release's operator apart.
*/}}
{{- define "posttrain.operatorSelector" -}}
{{- default (printf "job=%q" (include "posttrain.metricsServiceName" .)) .Values.monitoring.prometheusRule.operatorSelector -}}
{{- end -}}
